"""text5 with several seeds: mean ± std of each method's metrics (the README's main table).

Runs the same job as `sharecl run` once per seed (seed draws the splits, inits and batch
order), skipping a seed whose results already exist, then aggregates. Writes
results/text5_seeds.json.

    python benchmarks/bench_text5_seeds.py [--seeds 0,1,2] [--methods share,lora-per-task,seq-lora,head-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from _common import table, write
from sharecl.data.streams import get_stream
from sharecl.runner import run_stream
from sharecl.train import TrainConfig

METRICS = ["final_average_accuracy", "average_incremental_accuracy", "forgetting", "bwt"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default="share,lora-per-task,seq-lora,head-only")
    ap.add_argument("--out", default="runs/text5-seeds")
    ap.add_argument("--steps", type=int, default=80)
    a = ap.parse_args()
    methods = a.methods.split(",")
    per = {m: [] for m in methods}
    for seed in (int(s) for s in a.seeds.split(",")):
        out = Path(a.out) / f"seed{seed}"
        todo = [m for m in methods if not (out / m / "results.json").exists()]
        if todo:
            run_stream(get_stream("text5", seed=seed), todo, TrainConfig(steps=a.steps, seed=seed), out,
                       method_configs={m: {"r": 8} for m in todo}, progress=False)
        for m in methods:
            per[m].append(json.loads((out / m / "results.json").read_text()))
    rows = []
    for m, runs in per.items():
        row = {"method": m, "seeds": len(runs)}
        for key in METRICS:
            vals = [100 * r[key] for r in runs]
            row[key] = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.2f}"
            row[key + "_values"] = vals
        row["bytes_per_task"] = runs[0]["bytes_per_task"]
        row["head_bytes_per_task"] = runs[0]["head_bytes_per_task"]
        row["bytes_shared"] = runs[0]["bytes_shared"]
        row["train_seconds_total"] = statistics.mean(r["train_seconds_total"] for r in runs)
        rows.append(row)
    print(table(rows, ["method", "seeds", *METRICS, "bytes_per_task", "head_bytes_per_task", "bytes_shared", "train_seconds_total"]))
    print(write("text5_seeds", {"seeds": a.seeds, "steps": a.steps, "rows": rows}))


if __name__ == "__main__":
    main()
