"""A Share training step versus a PEFT LoRA training step, same model, batch and targets.

all-MiniLM-L6-v2 (query, value), batch 16 × 64 tokens of real BBC News text, forward +
backward + AdamW step. Share trains task 2 (coefficients + φ temporary directions on a
k-dimensional basis); LoRA is PEFT's rank-8 adapter. The two are timed interleaved, in one
process, and the ratio of medians is reported (the machine is shared and noisy).

    python benchmarks/bench_train_step.py [--steps 30] [--k 10] [--p 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from _common import table, write
from sharecl.backbone import load_encoder
from sharecl.data.streams import get_stream
from sharecl.methods import build_method
from sharecl.train import TrainConfig


def make_step(method, task, cfg):
    groups = method.begin_task(task, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr)
    xs, ys = task.train_inputs[: cfg.batch_size], torch.tensor(task.train_labels[: cfg.batch_size])
    batch = method.encoder.tokenize(xs)

    def step():
        z = method.encoder.encode(batch)
        loss = F.cross_entropy(method.heads(z, task.name), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--p", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(0)
    s = get_stream("text5", train_per_class=8, test_per_class=2)
    cfg = TrainConfig(steps=1, batch_size=16, max_length=64)
    share = build_method("share", load_encoder(max_length=64), p=a.p, k=a.k)
    share.learn(s.tasks[0], cfg, progress=False)  # seed the subspace, so task 2 trains coefficients
    lora = build_method("lora-per-task", load_encoder(max_length=64))
    steps = {"share": make_step(share, s.tasks[1], cfg), "peft-lora": make_step(lora, s.tasks[1], cfg)}
    times = {n: [] for n in steps}
    for _n, f in steps.items():  # warm-up
        f()
    for _ in range(a.steps):
        for n, f in steps.items():
            t0 = time.perf_counter()
            f()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    rows = [{"method": n, "median_s": med[n], "min_s": min(times[n]), "ratio_to_peft": med[n] / med["peft-lora"]} for n in steps]
    print(table(rows, ["method", "median_s", "min_s", "ratio_to_peft"]))
    print(write("train_step", {"k": a.k, "p": a.p, "batch_size": 16, "max_length": 64, "steps": a.steps, "rows": rows,
                               "raw_seconds": times}))


if __name__ == "__main__":
    main()
