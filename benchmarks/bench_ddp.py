"""Wall time of one text5 task with 1 and 2 processes (torchrun, gloo, CPU).

all-MiniLM-L6-v2, the first text5 task (seed 0), 80 AdamW steps of a global batch of 16,
then the between-task work (Share: merge; InfLoRA: covariance pass and memory update) and
the test evaluation. Configurations, each a fresh launch:

- ``1 proc × 2 threads``: plain ``python`` with both cores for intra-op parallelism;
- ``1 proc × 1 thread``;
- ``2 procs × 1 thread``: ``torchrun --nproc_per_node 2`` (DDP; each rank 8 examples per step).

``learn_s`` is the time of ``method.learn`` (training + between-task work) measured in rank 0;
``wall_s`` the whole launch (imports, model load, rendezvous). Accuracy must agree across
configurations up to float rounding.

    python benchmarks/bench_ddp.py [--methods share,inflora] [--steps 80]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(method_name: str, steps: int, out: str) -> None:
    import torch

    from sharecl import distributed as dist
    from sharecl.backbone import load_encoder
    from sharecl.data.streams import get_stream
    from sharecl.methods import build_method
    from sharecl.train import TrainConfig, evaluate

    dist.init_distributed(torch.device("cpu"))
    task = get_stream("text5", seed=0).tasks[0]
    cfg = TrainConfig(steps=steps, batch_size=16, lr=5e-3, head_lr=5e-3, max_length=64)
    method = build_method(method_name, load_encoder(max_length=64), seed=0)
    method.begin_stream(5)
    t0 = time.perf_counter()
    info = method.learn(task, cfg, progress=False)
    learn_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    acc = evaluate(lambda xs: method.logits(xs, task.name), task, cfg.eval_batch_size)
    eval_s = time.perf_counter() - t1
    if dist.is_main():
        Path(out).write_text(json.dumps({"learn_s": learn_s, "eval_s": eval_s, "accuracy": acc,
                                         "final_loss": info["final_loss"], "threads": torch.get_num_threads(),
                                         "world_size": dist.world_size()}))
    dist.shutdown()


def launch(method: str, steps: int, procs: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        args = [__file__, "--worker", method, "--steps", str(steps), "--out", str(out)]
        cmd = ([sys.executable] if procs == 1 else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]) + args
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - t0
        return {"method": method, "config": f"{procs} proc × {threads} thread", "procs": procs, "threads": threads,
                "wall_s": wall, **json.loads(out.read_text())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="share,inflora")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.steps, a.out)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import table, write

    rows = []
    for m in a.methods.split(","):
        for procs, threads in ((1, 2), (1, 1), (2, 1)):
            rows.append(launch(m, a.steps, procs, threads))
            print(rows[-1], flush=True)
        base = next(r for r in rows if r["method"] == m and r["procs"] == 1 and r["threads"] == 2)
        for r in rows:
            if r["method"] == m:
                r["learn_speedup_vs_1x2"] = base["learn_s"] / r["learn_s"]
    cols = ["method", "config", "learn_s", "eval_s", "wall_s", "learn_speedup_vs_1x2", "accuracy", "final_loss"]
    print(table(rows, cols))
    print(write("ddp", {"steps": a.steps, "rows": rows}))


if __name__ == "__main__":
    main()
