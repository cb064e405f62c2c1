"""LoRAs of a causal LM folded without data: Share beside lorashare 0.1.3 and vlora-dev 1.0.0 (Lots-of-LoRAs in miniature).

The paper's asynchronous experiment (about 500 rank-16 LoRAs of Mistral-7B folded into one basis,
0.97 of each task's ROUGE-L kept) on the packaged SmolLM2-135M-Instruct:

1. ``--tasks`` N generation tasks: gen30's 36 (``sharecl.generation.long_stream.GEN30_TASKS``),
   then ``GEN30_EXTRA_TASKS`` (14 more mappings of the same packaged sources) up to 50; each with
   gen30's seeded train / test split (``--train-size``, ``--test-size``). One **PEFT** LoRA per task
   (``--rank``, lora_alpha = 2·rank, q_proj/v_proj, no dropout), trained on its own data with the
   prompt-masked token loss (AdamW ``--lr``, ``--steps`` × ``--batch``, ``--precision``), saved with
   ``save_pretrained``; every odd-numbered adapter re-saved in another **gauge** (``B R``, ``R⁻¹ A``:
   the same ΔW). Cached under ``--workdir``; ``--train-only --shard I/S`` trains every S-th task
   from the I-th, so S processes can share the training.
2. Each task is scored by greedy generation with its metric (exact match or ROUGE-L, in [0, 1]) on
   its test split: with its original ΔW, and with none (zero-shot).
3. Each method folds the adapters one by one without data; after every ``--eval-every`` folds, every
   folded task is scored with the folded ΔW added to the base weights: ``retention`` = mean over
   tasks of folded ÷ original (tasks whose original scores ≥ 0.05), ``worst`` = the lowest such
   ratio, ``gain_kept`` = (folded − zero-shot) ÷ (original − zero-shot) on the mean scores, and the
   relative ΔW error ``‖ΔŴ − ΔW‖ / ‖ΔW‖``. Share folds with ``ShareMethod.add_adapter`` (what ``sharecl
   add-adapter`` runs); lorashare and vlora at the largest k whose stored numbers at N do not exceed
   Share's (**equal stored bytes**). ``bytes_vs_loras`` = Share's stored numbers ÷ the N LoRAs'.

Needs the two packages, which sharecl itself does not use::

    pip install -c constraints.txt lorashare==0.1.3 vlora-dev==1.0.0
    python benchmarks/bench_lm_adapters.py --train-only --shard 0/2 &   # optional: train on two cores
    python benchmarks/bench_lm_adapters.py --train-only --shard 1/2 ; wait
    python benchmarks/bench_lm_adapters.py [--tasks 50] [--k 24] [--p 4] [--eval-every 10] [--threads 1]

Writes ``results/lm-adapters.json`` and ``results/lm-adapters.png``, and saves Share's folded store
under the work directory (its path in the JSON's ``config.share_store``) for serving::

    python benchmarks/bench_generate.py --store STORE --peft-adapters WORKDIR --out generate-lm-adapters
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

import _folds
from _common import RESULTS, table, write
from _folds import LorashareFold, ShareBatchFold, ShareFold, VloraFold, plot, regauge_file, rel_error

TARGETS = ["q_proj", "v_proj"]
MIN_ORIGINAL = 0.05  # retention is a ratio: tasks whose own LoRA scores below this are left out of it


def lm_tasks(n: int, seed: int, train_size: int, test_size: int):
    """The first ``n`` tasks of gen30 followed by GEN30_EXTRA_TASKS (at most 50)."""
    from sharecl.generation.long_stream import GEN30_EXTRA_TASKS, GEN30_TASKS, gen30

    sources = (GEN30_TASKS + GEN30_EXTRA_TASKS)[:n]
    if len(sources) < n:
        raise SystemExit(f"--tasks {n}: the packaged sources give {len(sources)} tasks")
    return gen30(seed=seed, train_size=train_size, test_size=test_size, val_size=0, sources=sources).tasks


def train_adapters(lm, tasks, workdir: Path, args, only: range | None = None) -> None:
    """One PEFT LoRA per task under ``workdir/<task>`` (skipped when already there)."""
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    todo = [(i, t) for i, t in enumerate(tasks) if (only is None or i in only) and not (workdir / t.name / "train.json").exists()]
    for i, task in tqdm(todo, desc="training PEFT LoRAs"):
        d = workdir / task.name
        torch.manual_seed(args.seed * 100_003 + i)
        model = get_peft_model(copy.deepcopy(lm.model), LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                                                   lora_dropout=0.0))
        model.eval()  # no dropout: the run depends on the seed only
        e = dataclasses.replace(lm, model=model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        g = torch.Generator().manual_seed(args.seed * 100_003 + i)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            idx = torch.randint(len(task.train_inputs), (args.batch,), generator=g).tolist()
            loss = e.loss(e.tokenize([task.train_inputs[j] for j in idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_s = time.perf_counter() - t0
        model.save_pretrained(str(d))
        if i % 2:  # another trainer's gauge: rewrite the factors, same ΔW
            regauge_file(d / "adapter_model.safetensors", g)
        (d / "train.json").write_text(json.dumps({"train_s": train_s, "final_loss": loss.item(), "gauged": bool(i % 2)}))


class Scorer:
    """A task's test score by greedy generation, with a given ΔW added to the base weights."""

    def __init__(self, lm, layers):
        self.lm = lm
        self.lin = {n: m for n, m in lm.model.named_modules() if n in set(layers)}
        if len(self.lin) != len(set(layers)):
            raise RuntimeError(f"the adapters name layers the model lacks: {sorted(set(layers) - set(self.lin))[:3]}")
        self.W0 = {n: m.weight.detach().clone() for n, m in self.lin.items()}

    @torch.no_grad()
    def score(self, task, dW: dict[str, torch.Tensor] | None, batch_size: int = 32) -> float:
        from sharecl.generation.scoring import score

        try:
            for n, d in (dW or {}).items():
                self.lin[n].weight.add_(d.to(self.lin[n].weight.dtype))
            prompts = [p for p, _ in task.test_inputs]
            answers: list[str] = []
            for i in range(0, len(prompts), batch_size):
                answers += self.lm.generate(prompts[i: i + batch_size], max_new_tokens=task.max_new_tokens)
            return statistics.mean(score(task.metric, a, t) for a, (_, t) in zip(answers, task.test_inputs))
        finally:
            for n, w in self.W0.items():
                self.lin[n].weight.copy_(w)


def reused_scores(path: Path, workdir: Path, args, precision: str) -> dict[str, tuple[float, float]]:
    """``{task: (original, zero-shot)}`` from an earlier run's JSON, refused unless it scored the same
    adapters (work directory) on the same test split and precision."""
    d = json.loads(path.read_text())
    c = d["config"]
    same = {"adapters_dir": str(workdir), "test_size": args.test_size, "seed": args.seed, "precision": precision, "train_size": args.train_size}
    differ = {key: (c.get(key), v) for key, v in same.items() if c.get(key) != v}
    if differ:
        raise SystemExit(f"--reuse-scores {path}: scored other adapters or another split ({differ}); rescore instead")
    return {a["task"]: (a["original"], a["zero_shot"]) for a in d["adapters"]}


def summarize(acc: dict, orig: dict, zero: dict, errs: list[float]) -> dict:
    names = list(acc)
    ratios = {x: acc[x] / orig[x] for x in names if orig[x] >= MIN_ORIGINAL}
    mean = statistics.mean
    gain = mean(orig[x] for x in names) - mean(zero[x] for x in names)
    return {"retention": mean(ratios.values()) if ratios else None,
            "worst": min(ratios.values()) if ratios else None, "worst_task": min(ratios, key=ratios.get) if ratios else None,
            "score": mean(acc.values()), "original": mean(orig[x] for x in names),
            "gain_kept": (mean(acc.values()) - mean(zero[x] for x in names)) / gain if gain >= 0.02 else None,
            "dW_rel_error": mean(errs), "dW_rel_error_max": max(errs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a causal LM directory or .gguf (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--tasks", type=int, default=50)
    ap.add_argument("--train-size", type=int, default=120)
    ap.add_argument("--test-size", type=int, default=24)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--k", type=int, default=24)
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--methods", default="share,lorashare,vlora", help="any of share, lorashare, vlora, share-batches")
    ap.add_argument("--batch-size-fold", type=int, default=10, help="share-batches: adapters per batch (the paper's batch arrival)")
    ap.add_argument("--reuse-scores", type=Path, default=None,
                    help="an earlier run's JSON on the same adapters: take its original and zero-shot scores instead of rescoring")
    ap.add_argument("--precision", default="auto", choices=["fp32", "bf16", "auto"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "sharecl" / "bench-lm-adapters")
    ap.add_argument("--train-only", action="store_true", help="train (and cache) the adapters, then stop")
    ap.add_argument("--shard", default="0/1", help="I/S: with --train-only, train tasks I, I+S, I+2S, …")
    ap.add_argument("--out", default="lm-adapters")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file
    from tqdm import tqdm

    from sharecl.distributed import resolve_precision
    from sharecl.generation.lm import load_causal_lm
    from sharecl.interop.peft import read_lora_adapter

    precision = resolve_precision(args.precision, torch.device("cpu"))
    lm = load_causal_lm(args.model, max_length=192, precision=precision)
    tasks = lm_tasks(args.tasks, args.seed, args.train_size, args.test_size)
    workdir = args.workdir / f"{Path(lm.path).name}-seed-{args.seed}-r{args.rank}-steps-{args.steps}-lr-{args.lr:g}-{precision}"
    i, s = (int(x) for x in args.shard.split("/"))
    train_adapters(lm, tasks, workdir, args, range(i, len(tasks), s) if args.train_only else None)
    if args.train_only:
        return
    info = [{"task": t.name, "metric": t.metric, **json.loads((workdir / t.name / "train.json").read_text())} for t in tasks]
    loras = {t.name: read_lora_adapter(workdir / t.name) for t in tasks}
    sds = {t.name: load_file(str(workdir / t.name / "adapter_model.safetensors")) for t in tasks}
    exact = {n: {layer: lo.scaling * B @ A for layer, (B, A) in lo.factors.items()} for n, lo in loras.items()}
    scorer = Scorer(lm, next(iter(exact.values())))
    orig, zero = {}, {}
    earlier = reused_scores(args.reuse_scores, workdir, args, precision) if args.reuse_scores else {}
    for row, t in zip(info, tqdm(tasks, desc="scoring the original LoRAs and zero-shot")):
        if t.name in earlier:
            row["original"], row["zero_shot"] = earlier[t.name]
        else:
            row["original"], row["zero_shot"] = scorer.score(t, exact[t.name]), scorer.score(t, None)
        orig[t.name], zero[t.name] = row["original"], row["zero_shot"]

    r, scaling = args.rank, next(iter(loras.values())).scaling  # lora_alpha / r, as the adapters' configs say
    share = ShareFold(load_causal_lm(args.model, max_length=192, precision=precision), r, 2 * r, args.k, args.p,
                      target_modules=TARGETS)
    shapes = [(layer.out_features, layer.in_features) for layer in share.m.layers.values()]
    N = len(tasks)
    share_total = _folds.share_numbers(args.k, args.p, shapes, N)
    lora_total = N * r * sum(o + i for o, i in shapes)
    k_ls, k_vl = _folds.equal_bytes(share_total, shapes, N, r)
    chosen = args.methods.split(",")
    makers = {"share": lambda: share, "lorashare": lambda: LorashareFold(k_ls, scaling), "vlora": lambda: VloraFold(k_vl, scaling),
              "share-batches": lambda: ShareBatchFold(load_causal_lm(args.model, max_length=192, precision=precision), r, 2 * r,
                                                      args.k, args.p, args.batch_size_fold, target_modules=TARGETS)}
    if "share-batches" in chosen and args.eval_every % args.batch_size_fold:
        raise SystemExit(f"--eval-every {args.eval_every} must be a multiple of --batch-size-fold {args.batch_size_fold}")
    folds = [makers[key]() for key in makers if key in chosen]
    curves: dict[str, list[dict]] = {f.name: [] for f in folds}
    for f in folds:
        for n, t in enumerate(tqdm(tasks, desc=f"folding · {f.name}"), 1):
            t0 = time.perf_counter()
            f.add(t.name, loras[t.name], sds[t.name])
            point: dict = {"n": n, "add_s": time.perf_counter() - t0}
            if n % args.eval_every == 0 or n == N:
                names = [x.name for x in tasks[:n]]
                deltas = {x: f.delta(x) for x in names}
                errs = [rel_error(deltas[x], exact[x]) for x in names]
                acc = {x.name: scorer.score(x, deltas[x.name]) for x in tasks[:n]}
                point.update(summarize(acc, orig, zero, errs))
                if n == N:
                    point["per_task"] = {x: {"score": acc[x], "dW_rel_error": e} for x, e in zip(names, errs)}
            curves[f.name].append(point)

    store = None
    if share in folds:  # the folded store, for serving (bench_generate.py --store … --peft-adapters …)
        from sharecl.store import save_store

        store = workdir / f"share-store-k{args.k}-p{args.p}-n{N}"
        save_store(share.m, store)
    rows = []
    for f in folds:
        last = curves[f.name][-1]
        k = args.k if isinstance(f, ShareFold) else (k_ls if isinstance(f, LorashareFold) else k_vl)
        stored = share_total if isinstance(f, ShareFold) else _folds.stored_numbers("lorashare" if isinstance(f, LorashareFold) else "vlora",
                                                                       k, shapes, N, r)
        rows.append({"method": f.name, "k": k, "stored_numbers": stored, "bytes_vs_loras": stored / lora_total,
                     **{c: last[c] for c in ("retention", "worst", "worst_task", "gain_kept", "score", "dW_rel_error")},
                     "add_s_last": last["add_s"]})
    learned = [x for x in info if x["original"] >= MIN_ORIGINAL]
    print(f"\n{N} PEFT LoRAs (r={r}) on {Path(lm.path).name}: mean original score {statistics.mean(orig.values()):.4f}, "
          f"zero-shot {statistics.mean(zero.values()):.4f}; {len(learned)} tasks score ≥ {MIN_ORIGINAL} with their own LoRA\n")
    print(table(info, ["task", "metric", "zero_shot", "original", "train_s"]))
    print()
    print(table(rows, list(rows[0])))
    reused = str(args.reuse_scores) if args.reuse_scores else None
    path = write(args.out, {"config": {**vars(args), "workdir": str(args.workdir), "reuse_scores": reused, "lora_alpha": 2 * r, "targets": TARGETS,
                                       "precision": precision, "k_lorashare": k_ls, "k_vlora": k_vl, "model": lm.path,
                                       "share_numbers": share_total, "lora_numbers": lora_total,
                                       "share_store": str(store) if store else None, "adapters_dir": str(workdir)},
                            "summary": rows, "adapters": info, "curves": curves})
    zero_ret = statistics.mean(zero[x["task"]] / x["original"] for x in learned) if learned else 0.0
    plot(curves, zero_ret, RESULTS / f"{args.out}.png", bare_label="zero-shot (no adapter)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
