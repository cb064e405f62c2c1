"""Share's accuracy against bytes per task on a stream (text5 by default), over basis size k and pseudo-rank p.

Each setting runs the full stream (same steps, seed and data as `sharecl run`) and
records final average accuracy, forgetting, BWT, adapter bytes per task and the largest
drift any old task suffered at a merge. Writes results/share_curve.json and a plot
results/share_curve.png (accuracy vs. bytes per task, LoRA-per-task bytes marked), or
share_curve-<stream>.json / .png; the JSON is rewritten after every setting. With --keep, rows
already in that JSON for the same stream, steps and seed are kept and their settings not rerun
(so a long grid can be run in parts, or resumed after a kill).

    python benchmarks/bench_share_curve.py [--settings 2x2,4x2,10x2,5x1,16x4,32x8] [--steps 80] [--stream text20] [--keep]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from _common import RESULTS, table, write
from sharecl.data.streams import get_stream
from sharecl.runner import run_method
from sharecl.train import TrainConfig

LORA_BYTES_PER_TASK = 12 * 8 * (384 + 384) * 4  # rank-8 LoRA on MiniLM's 12 query/value layers, float32


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="2x2,4x2,10x2,5x1,16x4,32x8", help="comma-separated KxP")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream", default="text5", help="a text stream on MiniLM (text5, text20, ...)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", action="store_true", help="keep rows already written for this stream, steps and seed")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    name = "share_curve" if a.stream == "text5" else f"share_curve-{a.stream}"
    stream = get_stream(a.stream, seed=a.seed)
    cfg = TrainConfig(steps=a.steps, seed=a.seed)
    rows = kept_rows(RESULTS / f"{name}.json", a) if a.keep else []
    done = {(r["k"], r["p"]) for r in rows}
    for setting in a.settings.split(","):
        k, p = (int(v) for v in setting.split("x"))
        if (k, p) in done:
            print(f"k={k} p={p}: kept from the existing JSON", flush=True)
            continue
        with tempfile.TemporaryDirectory() as d:
            res = run_method("share", stream, cfg, Path(d), method_config={"k": k, "p": p}, progress=False,
                             log=lambda *x: None)
        worst = max((v["max"] for m in res["merges"] for v in m["per_task"].values()), default=0.0)
        rows.append({"k": k, "p": p, "final_acc": 100 * res["final_average_accuracy"],
                     "forgetting": 100 * res["forgetting"], "bwt": 100 * res["bwt"],
                     "bytes_per_task": res["bytes_per_task"], "pct_of_lora": 100 * res["bytes_per_task"] / LORA_BYTES_PER_TASK,
                     "bytes_shared": res["bytes_shared"], "max_drift_pct": 100 * worst,
                     "final_k": res["merges"][-1]["k"][0], "accuracy_matrix": res["accuracy_matrix"]})
        print(f"k={k} p={p}: final {rows[-1]['final_acc']:.2f}%, forgetting {rows[-1]['forgetting']:.2f}, "
              f"{res['bytes_per_task']:.0f} B/task ({rows[-1]['pct_of_lora']:.2f}% of LoRA)", flush=True)
        write(name, {"stream": a.stream, "tasks": len(stream), "steps": a.steps, "seed": a.seed,
                    "lora_bytes_per_task": LORA_BYTES_PER_TASK, "rows": rows})
    print(table(rows, ["k", "p", "final_acc", "forgetting", "bwt", "bytes_per_task", "pct_of_lora", "max_drift_pct"]))
    print(RESULTS / f"{name}.json")
    plot(rows, a.stream, RESULTS / f"{name}.png")


def kept_rows(path: Path, a) -> list[dict]:
    """Rows of an earlier run of the same stream, steps and seed (none if the file is absent or differs)."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if (old.get("stream"), old.get("steps"), old.get("seed")) != (a.stream, a.steps, a.seed):
        print(f"{path.name} holds another run ({old.get('stream')}, {old.get('steps')} steps, seed {old.get('seed')}); "
              "not keeping its rows", flush=True)
        return []
    return list(old["rows"])


def plot(rows, stream: str, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter([r["bytes_per_task"] for r in rows], [r["final_acc"] for r in rows], c="C0")
    for r in rows:
        ax.annotate(f"k={r['k']}, p={r['p']}", (r["bytes_per_task"], r["final_acc"]), textcoords="offset points",
                    xytext=(5, -10), fontsize=8)
    ax.axvline(LORA_BYTES_PER_TASK / 100, color="C3", ls="--", lw=1, label="1% of a LoRA's bytes")
    ax.set_xscale("log")
    ax.set_xlabel("adapter bytes stored per task (log)")
    ax.set_ylabel(f"final average accuracy on {stream} (%)")
    ax.set_title("Share: accuracy vs. bytes per task")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
