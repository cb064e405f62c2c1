"""Adapters folded in without data, at scale: Share beside lorashare 0.1.3 and vlora-dev 1.0.0.

Share's "asynchronous" mode (Lots-of-LoRAs in the paper) in miniature, on real tasks:

1. ``--tasks`` N two-class text tasks of the ``text-pairs`` stream (WordNet noun / verb
   supersense pairs, BBC topic, fortune topic and language pairs); one **PEFT** LoRA (r = 8,
   lora_alpha = 16, MiniLM's query/value) and a linear head trained per task on its own data
   (AdamW, ``--steps`` × batch 16), saved with ``save_pretrained``. ``--head frozen``: the head
   keeps its random init and only the LoRA trains, so the task lives in the adapter (without it
   the head scores near chance) — the stricter test of what folding keeps. Every odd-numbered adapter
   is saved in another **gauge**: ``B R``, ``R⁻¹ A`` with a random well-conditioned R per layer
   (the same ΔW, as a different trainer may produce). Cached under ``--workdir``.
2. Each method folds the adapters one by one, without data, and after every ``--eval-every``
   folds every task folded so far is scored with its original head against its original
   LoRA: ``retention`` = mean of folded ÷ original accuracy (the paper's measure); since a
   head alone already scores well on two-class tasks, also ``gain_kept`` = (folded − head
   without its adapter) ÷ (original − head without its adapter), accuracies averaged over the
   tasks (None while the adapters add under 2 points), and ``agreement`` = the fraction of test
   predictions equal to the original's; beside
   the relative ΔW error ``‖ΔŴ − ΔW‖ / ‖ΔW‖`` over all adapted layers (mean over tasks):

   - **Share** (``ShareMethod.add_adapter`` after ``read_lora_adapter``, as ``sharecl
     add-adapter`` does; k, p from the flags);
   - **lorashare** 0.1.3: recompresses all n adapters at once (its ``compression`` functions on
     in-memory state dicts, i.e. ``SHAREModel.from_adapters`` without the disk reads — a lower
     bound on its cost), components per (layer, side) = ``k_lorashare``;
   - **vlora-dev** 1.0.0: ``SharedSubspace.from_adapters`` on the first ``k_vlora + 1`` adapters
     (fewer cannot give k components after its centring), then ``absorb_incremental``.

   ``k_lorashare`` and ``k_vlora`` are the largest values whose stored numbers (shared basis +
   N × per-task numbers, heads excluded) do not exceed Share's at N: **equal stored bytes**.
3. ``--timing``: seconds to add the n-th adapter at each n (n beyond N cycles the real adapters
   with fresh gauges: the same ΔW, new factors). Share: the n-th ``add_adapter`` in sequence;
   lorashare: recompressing n; vlora: the n-th ``absorb_incremental`` on a subspace built from n − 1.

Needs the two packages, which sharecl itself does not use::

    pip install -c constraints.txt lorashare==0.1.3 vlora-dev==1.0.0
    python benchmarks/bench_adapters.py [--tasks 60] [--k 32] [--p 8] [--timing 10,100,1000] [--threads 1]

Writes ``results/adapters.json`` and ``results/adapters.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

import _folds
from _common import RESULTS, table, write
from _folds import LorashareFold, VloraFold, gauge, lorashare_compress, plot, regauge_file, rel_error, vlora_weights

R, ALPHA, MAXLEN, BATCH = 8, 16, 64, 16
SCALE = ALPHA / R
TARGETS = ["query", "value"]


def train_adapters(tasks, workdir: Path, steps: int, lr: float, seed: int, frozen_head: bool = False) -> list[dict]:
    """One PEFT LoRA + head per task under ``workdir/<task>`` (reused if present); with
    ``frozen_head`` the head keeps its random init and only the LoRA trains."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from tqdm import tqdm

    from sharecl.backbone import load_encoder

    enc = None
    info = []
    for i, task in enumerate(tqdm(tasks, desc="training PEFT LoRAs")):
        d = workdir / task.name
        if not (d / "head.safetensors").exists():
            enc = enc or load_encoder(max_length=MAXLEN)
            torch.manual_seed(seed * 100_003 + i)
            model = get_peft_model(copy.deepcopy(enc.model),
                                   LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))
            model.eval()  # no dropout: the run depends on the seed only
            e = dataclasses.replace(enc, model=model)
            head = torch.nn.Linear(enc.hidden_size, task.num_classes)
            head.requires_grad_(not frozen_head)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]
                                    + ([] if frozen_head else list(head.parameters())), lr=lr)
            g = torch.Generator().manual_seed(seed * 100_003 + i)
            t0 = time.perf_counter()
            for _ in range(steps):
                idx = torch.randint(len(task.train_inputs), (BATCH,), generator=g).tolist()
                loss = F.cross_entropy(head(e.encode(e.tokenize([task.train_inputs[j] for j in idx]))),
                                       torch.tensor([task.train_labels[j] for j in idx]))
                opt.zero_grad()
                loss.backward()
                opt.step()
            train_s, loss = time.perf_counter() - t0, loss.detach()
            model.save_pretrained(str(d))
            if i % 2:  # another trainer's gauge: rewrite the factors, same ΔW
                regauge_file(d / "adapter_model.safetensors", g)
            save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(d / "head.safetensors"),
                      metadata={"train_s": f"{train_s:.3f}", "loss": f"{loss.item():.4f}"})
        from safetensors import safe_open

        with safe_open(str(d / "head.safetensors"), "pt") as fh:
            meta = fh.metadata()
        info.append({"task": task.name, "gauged": bool(i % 2), "train_s": float(meta["train_s"]), "final_loss": float(meta["loss"])})
    return info


class Scorer:
    """Accuracy of a task's head on its test split with a given ΔW added to the base weights."""

    def __init__(self, tasks):
        from sharecl.backbone import load_encoder

        self.enc = load_encoder(max_length=MAXLEN)
        self.lin = {n: m for n, m in self.enc.model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
        self.W0 = {n: m.weight.detach().clone() for n, m in self.lin.items()}
        self.batches = {t.name: (self.enc.tokenize(t.test_inputs), torch.tensor(t.test_labels)) for t in tasks}

    @torch.no_grad()
    def predict(self, task: str, head: torch.nn.Linear, dW: dict[str, torch.Tensor] | None) -> tuple[float, torch.Tensor]:
        """``(accuracy, predicted labels (N,) int64)``."""
        try:
            for n, d in (dW or {}).items():
                self.lin[n].weight.add_(d)
            batch, y = self.batches[task]
            pred = head(self.enc.encode(batch)).argmax(-1)
            return float((pred == y).float().mean()), pred
        finally:
            for n, w in self.W0.items():
                self.lin[n].weight.copy_(w)


class ShareFold(_folds.ShareFold):
    def __init__(self, k: int, p: int):
        from sharecl.backbone import load_encoder

        super().__init__(load_encoder(max_length=MAXLEN), R, ALPHA, k, p)


def stored_numbers(method: str, k: int, shapes, n: int) -> int:
    return _folds.stored_numbers(method, k, shapes, n, R)


def equal_bytes(share_total: int, shapes: list[tuple[int, int]], n: int) -> tuple[int, int]:
    return _folds.equal_bytes(share_total, shapes, n, R)


# ------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=60)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--timing", default="10,100,1000")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sharecl" / "bench-adapters")
    ap.add_argument("--head", choices=["trained", "frozen"], default="trained",
                    help="frozen: each head keeps its random init and only the LoRA trains, so a task lives in its adapter")
    ap.add_argument("--out", default=None, help="default: adapters, adapters-frozen-head, or adapters-timing")
    ap.add_argument("--timing-only", action="store_true",
                    help="Only the add-time rows, on --tasks random adapters of MiniLM's shapes (no training, no scores).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    from tqdm import tqdm

    from sharecl.data.streams import get_stream
    from sharecl.interop.peft import read_lora_adapter

    if args.timing_only:
        return timing_only(args)
    tasks = get_stream("text-pairs", seed=args.seed, num_tasks=args.tasks).tasks
    args.out = args.out or ("adapters" if args.head == "trained" else "adapters-frozen-head")
    workdir = args.workdir / f"seed-{args.seed}-steps-{args.steps}-lr-{args.lr:g}{'-frozen-head' if args.head == 'frozen' else ''}"
    info = train_adapters(tasks, workdir, args.steps, args.lr, args.seed, frozen_head=args.head == "frozen")
    loras = {t.name: read_lora_adapter(workdir / t.name) for t in tasks}
    sds = {t.name: load_file(str(workdir / t.name / "adapter_model.safetensors")) for t in tasks}
    heads = {}
    for t in tasks:
        h = torch.nn.Linear(loras[t.name].factors[next(iter(loras[t.name].factors))][1].shape[1], t.num_classes)
        h.load_state_dict(load_file(str(workdir / t.name / "head.safetensors")))
        heads[t.name] = h
    exact = {n: {layer: SCALE * B @ A for layer, (B, A) in lo.factors.items()} for n, lo in loras.items()}

    scorer = Scorer(tasks)
    preds = {}
    for row, t in zip(info, tqdm(tasks, desc="scoring the originals")):
        row["original"], preds[t.name] = scorer.predict(t.name, heads[t.name], exact[t.name])
        row["without_adapter"], bare_pred = scorer.predict(t.name, heads[t.name], None)
        row["agreement_without_adapter"] = float((bare_pred == preds[t.name]).float().mean())
    orig = {r["task"]: r["original"] for r in info}
    bare_acc = {r["task"]: r["without_adapter"] for r in info}

    share = ShareFold(args.k, args.p)
    shapes = [(layer.out_features, layer.in_features) for layer in share.m.layers.values()]
    N = len(tasks)
    share_total = _folds.share_numbers(share.m.config.k, args.p, shapes, N)
    k_ls, k_vl = equal_bytes(share_total, shapes, N)
    folds = [share, LorashareFold(k_ls, SCALE), VloraFold(k_vl, SCALE)]
    curves = {f.name: [] for f in folds}
    for f in folds:
        for n, t in enumerate(tqdm(tasks, desc=f"folding · {f.name}"), 1):
            t0 = time.perf_counter()
            f.add(t.name, loras[t.name], sds[t.name])
            add_s = time.perf_counter() - t0
            names = [x.name for x in tasks[:n]]
            point = {"n": n, "add_s": add_s}
            if n >= 2 and (n % args.eval_every == 0 or n == N):
                deltas = {x: f.delta(x) for x in names}
                errs = [rel_error(deltas[x], exact[x]) for x in names]
                acc, agree = {}, {}
                for x in names:
                    acc[x], pred = scorer.predict(x, heads[x], deltas[x])
                    agree[x] = float((pred == preds[x]).float().mean())
                mean = statistics.mean
                gain = mean(orig[x] for x in names) - mean(bare_acc[x] for x in names)
                point.update(dW_rel_error=mean(errs), dW_rel_error_max=max(errs),
                             retention=mean(acc[x] / orig[x] for x in names), accuracy=mean(acc.values()),
                             gain_kept=(mean(acc.values()) - mean(bare_acc[x] for x in names)) / gain if gain >= 0.02 else None,
                             agreement=mean(agree.values()))
                if n == N:
                    point["per_task"] = {x: {"accuracy": acc[x], "dW_rel_error": e} for x, e in zip(names, errs)}
            curves[f.name].append(point)

    # Share's routed forward (what `sharecl serve` runs) agrees with the folded-ΔW scorer
    routed = []
    with torch.no_grad():
        for t in tasks[:5]:
            share.m.heads.add(t.name, t.num_classes)
            share.m.heads.heads[t.name].load_state_dict(heads[t.name].state_dict())
            routed.append(float((share.m.logits(t.test_inputs, t.name).argmax(-1) == torch.tensor(t.test_labels)).float().mean()))
    routed_check = {t.name: {"routed": a, "folded": curves["Share"][-1]["per_task"][t.name]["accuracy"]} for t, a in zip(tasks, routed)}

    ns = [int(x) for x in args.timing.split(",") if x]
    timing = timing_runs(share, loras, sds, tasks, ns, k_ls, k_vl, args.seed)
    for n in ns:
        if n <= N:  # the same sequence of folds: the curve holds it
            timing["Share"][n] = curves["Share"][n - 1]["add_s"]

    rows = []
    for f in folds:
        last = curves[f.name][-1]
        k = args.k if f is share else (k_ls if isinstance(f, LorashareFold) else k_vl)
        stored = share_total if f is share else stored_numbers("lorashare" if isinstance(f, LorashareFold) else "vlora",
                                                                     k, shapes, N)
        rows.append({"method": f.name, "k": k, "stored_numbers": stored, "retention": last["retention"],
                     "gain_kept": last["gain_kept"], "agreement": last["agreement"], "accuracy": last["accuracy"],
                     "dW_rel_error": last["dW_rel_error"],
                     **{f"add_s@{n}": timing[f.name].get(n) for n in ns}})
    orig_acc = statistics.mean(orig.values())
    bare = statistics.mean(bare_acc[x] / orig[x] for x in orig)
    cols = list(rows[0])
    print(f"\n{N} PEFT LoRAs (r={R}), mean original accuracy {orig_acc:.4f}, head without its adapter "
          f"{statistics.mean(bare_acc.values()):.4f} (retains {bare:.4f}, agrees on "
          f"{statistics.mean(r['agreement_without_adapter'] for r in info):.4f} of predictions)\n")
    print(table(rows, cols))
    path = write(args.out, {"config": {**vars(args), "workdir": str(args.workdir), "r": R, "lora_alpha": ALPHA,
                                       "max_length": MAXLEN, "batch": BATCH, "k_lorashare": k_ls, "k_vlora": k_vl},
                            "summary": rows, "original_accuracy": orig_acc, "retention_without_adapter": bare,
                            "accuracy_without_adapter": statistics.mean(bare_acc.values()),
                            "adapters": info, "curves": curves, "timing": {m: {str(n): s for n, s in v.items()} for m, v in timing.items()},
                            "routed_check": routed_check})
    plot(curves, bare, RESULTS / f"{args.out}.png", bare_label="head without its adapter")
    print(f"wrote {path}")


def timing_only(args) -> None:
    """``--timing-only``: seconds to add the n-th adapter, Share vs lorashare vs vlora at equal
    bytes, on random rank-8 adapters of MiniLM's query/value shapes (cost depends on shapes only)."""
    from types import SimpleNamespace

    share = ShareFold(args.k, args.p)
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in share.m.layers.items()}
    g = torch.Generator().manual_seed(args.seed)
    tasks = [SimpleNamespace(name=f"t{i}") for i in range(args.tasks)]
    loras = {t.name: SimpleNamespace(factors={n: (torch.randn(o, R, generator=g) * 0.02, torch.randn(R, i, generator=g) * 0.02)
                                              for n, (o, i) in shapes.items()}, scaling=SCALE, rank=R) for t in tasks}
    N = len(tasks)
    share_total = _folds.share_numbers(share.m.config.k, args.p, list(shapes.values()), N)
    k_ls, k_vl = equal_bytes(share_total, list(shapes.values()), N)
    first = {}
    for n, t in enumerate(tasks, 1):
        t0 = time.perf_counter()
        share.add(t.name, loras[t.name], None)
        first[n] = time.perf_counter() - t0
    ns = [int(x) for x in args.timing.split(",") if x]
    timing = timing_runs(share, loras, None, tasks, ns, k_ls, k_vl, args.seed)
    timing["Share"].update({n: first[n] for n in ns if n <= N})
    rows = [{"method": m, **{f"add_s@{n}": v.get(n) for n in ns}} for m, v in timing.items()]
    rows.append({"method": "lorashare ÷ Share", **{f"add_s@{n}": timing["lorashare 0.1.3"][n] / timing["Share"][n] for n in ns}})
    print(f"\nSeconds to add the n-th adapter (random r={R} adapters, MiniLM query/value, k={args.k}, p={args.p}; "
          f"equal bytes at n={N}: k_lorashare={k_ls}, k_vlora={k_vl}; {args.threads} thread(s))\n")
    print(table(rows, list(rows[0])))
    config = {**vars(args), "workdir": str(args.workdir), "k_lorashare": k_ls, "k_vlora": k_vl}
    print(f"wrote {write(args.out or 'adapters-timing', {'config': config, 'rows': rows})}")


def timing_runs(share: ShareFold, loras, sds, tasks, ns: list[int], k_ls: int, k_vl: int, seed: int) -> dict:
    """Seconds to add the n-th adapter for each method (beyond N: real adapters again, fresh gauges)."""
    from types import SimpleNamespace

    from tqdm import tqdm

    if not ns:
        return {}
    g = torch.Generator().manual_seed(seed + 77)
    N, top = len(tasks), max(ns)

    def copy_of(j):
        src = loras[tasks[j % N].name]
        factors = {n: gauge(B, A, g) for n, (B, A) in src.factors.items()} if j >= N else src.factors
        return SimpleNamespace(factors=factors, scaling=src.scaling, rank=src.rank)

    extra = [copy_of(j) for j in range(top)]
    out = {"Share": {}, "lorashare 0.1.3": {}, "vlora-dev 1.0.0": {}}
    for j, n in enumerate(range(N + 1, top + 1), N):  # Share continues the same sequence of folds
        t0 = time.perf_counter()
        share.m.add_adapter(f"x{n}", extra[j].factors, extra[j].scaling)
        if n in ns:
            out["Share"][n] = time.perf_counter() - t0
    from vlora import SharedSubspace

    def state_dict(lo):
        return {f"base_model.model.{n}.lora_{s}.weight": (B if s == "B" else A) for n, (B, A) in lo.factors.items() for s in "AB"}

    for n in tqdm(ns, desc="timing lorashare / vlora"):
        sd = {f"a{j}": state_dict(extra[j]) for j in range(n)}
        reps = []
        for _ in range(3 if n <= 100 else 1):
            t0 = time.perf_counter()
            lorashare_compress(sd, k_ls)
            reps.append(time.perf_counter() - t0)
        out["lorashare 0.1.3"][n] = min(reps)
        if n - 1 >= k_vl + 1:
            sub = SharedSubspace.from_adapters([vlora_weights(extra[j]) for j in range(n - 1)], task_ids=[f"a{j}" for j in range(n - 1)],
                                               num_components=k_vl)
            t0 = time.perf_counter()
            sub.absorb_incremental(vlora_weights(extra[n - 1]), f"a{n - 1}")
            out["vlora-dev 1.0.0"][n] = time.perf_counter() - t0
    return out


if __name__ == "__main__":
    main()
