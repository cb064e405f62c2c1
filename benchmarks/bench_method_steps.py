"""Training-step and inference cost of every continual method, side by side.

all-MiniLM-L6-v2 (query, value), batch 16 × 64 tokens of real text5 data. Each method
first learns task 1 for one step (so old directions, memories and bases exist), then
begins task 2; we time, interleaved in one process (the machine is shared and noisy):

- ``train_step_s``: forward + backward + AdamW step on task 2 (``logits(training=True)``);
- ``til_forward_s``: a no-grad forward of 64 test inputs with the task id;
- ``cil_forward_s``: the same without a task id (``cil_logits``), where supported.

Medians over ``--steps`` rounds; ratios are to PEFT LoRA's training step.

    python benchmarks/bench_method_steps.py [--steps 20]
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

METHODS = ["share", "inflora", "sd-lora", "dual-lora", "lora-per-task", "seq-lora"]


def prepare(name, tasks, cfg):
    m = build_method(name, load_encoder(max_length=64), seed=0)
    m.begin_stream(len(tasks))
    m.learn(tasks[0], cfg, progress=False)
    groups = m.begin_task(tasks[1], cfg)
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
    t = tasks[1]
    xs, ys = t.train_inputs[: cfg.batch_size], torch.tensor(t.train_labels[: cfg.batch_size])
    test = (tasks[0].test_inputs + t.test_inputs)[:64]

    def train_step():
        loss = F.cross_entropy(m.logits(xs, t.name, training=True), ys)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def til():
        with torch.no_grad():
            m.logits(test, tasks[0].name)

    def cil():
        m.cil_logits(test)

    return {"train_step_s": train_step, "til_forward_s": til, "cil_forward_s": cil if "cil" in m.scenarios else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    s = get_stream("text5", train_per_class=8, test_per_class=8)
    cfg = TrainConfig(steps=1, batch_size=16, max_length=64)
    fns = {n: prepare(n, s.tasks[:2], cfg) for n in METHODS}
    times = {n: {k: [] for k, f in d.items() if f} for n, d in fns.items()}
    for _n, d in fns.items():  # warm-up
        for f in d.values():
            if f:
                f()
    for _ in range(a.steps):
        for n, d in fns.items():
            for k, f in d.items():
                if f:
                    t0 = time.perf_counter()
                    f()
                    times[n][k].append(time.perf_counter() - t0)
    base = statistics.median(times["lora-per-task"]["train_step_s"])
    rows = []
    for n in METHODS:
        row = {"method": n, **{k: statistics.median(v) for k, v in times[n].items()}}
        row["train_ratio_to_peft"] = row["train_step_s"] / base
        rows.append(row)
    cols = ["method", "train_step_s", "train_ratio_to_peft", "til_forward_s", "cil_forward_s"]
    print(table(rows, cols))
    print(write("method_steps", {"batch_size": 16, "eval_batch": 64, "max_length": 64, "steps": a.steps, "rows": rows,
                                 "raw_seconds": times}))


if __name__ == "__main__":
    main()
