"""A Share store with 10² … 10⁴ tasks: adding the n-th task, loading the store, bytes written.

For each n, a store on the packaged MiniLM (12 query/value layers of 384², Share k and p as
given) is built holding n − 1 adapter-only tasks (random orthonormal bases and random
coefficients, written once as a checkpoint: what n − 1 merges leave, without running them),
then ``--adds`` more LoRA adapters (rank r, random factors) are folded in with
``add_adapter`` + ``save_store`` exactly as ``sharecl add-adapter`` does. Each add is timed
(merge, durable write) and its bytes counted (new files + manifest). Then the store is loaded in
a fresh process (``load_store`` wall time after imports, beside loading the bare model; peak RSS) and its
coefficients are compared with the writer's, bit for bit. ``add_s_median`` is over the adds
that appended a log file (the usual case); a row also counts the adds that wrote a checkpoint
instead (the log would have outgrown it), whose bytes are the checkpoint's.

    python benchmarks/bench_store_scale.py [--tasks 100,1000,10000] [--k 32] [--p 4] [--adds 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import table, write

LOAD = r"""
import json, resource, sys, time
from sharecl.backbone import default_model_path, load_encoder
from sharecl.store import load_store
t0 = time.perf_counter()
load_encoder(default_model_path(), max_length=32)
base = time.perf_counter() - t0
t0 = time.perf_counter()
m = load_store(sys.argv[1])
dt = time.perf_counter() - t0
import torch
from safetensors.torch import save_file
save_file({f"{n}.{s}": getattr(l, f"coeff_{s}").contiguous() for n, l in m.layers.items() for s in "BA"}, sys.argv[2])
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"load_s": dt, "model_load_s": base, "tasks": len(m.task_names), "peak_rss_mb": rss}))
"""


def build(n_old: int, k: int, p: int, seed: int = 0):
    """A Share method on MiniLM holding ``n_old`` adapter-only tasks (synthetic, as merges leave them)."""
    from sharecl.backbone import default_model_path, load_encoder
    from sharecl.coeff_log import CoefficientLog
    from sharecl.methods.share import ShareMethod

    m = ShareMethod(load_encoder(default_model_path(), max_length=32), seed=seed, r=8, lora_alpha=16, p=p, k=k)
    g = torch.Generator().manual_seed(seed)
    for layer in m.layers.values():
        U = torch.linalg.qr(torch.randn(layer.out_features, k, generator=g, dtype=torch.float64))[0].float()
        V = torch.linalg.qr(torch.randn(layer.in_features, k, generator=g, dtype=torch.float64))[0].float()
        cB = torch.randn(n_old, k, p, generator=g) * 0.05
        cA = torch.randn(n_old, k, p, generator=g) * 0.05
        layer.load_logs(U, V, CoefficientLog(cB), CoefficientLog(cA))
    m.task_names = [f"t{i}" for i in range(n_old)]
    m.task_classes = {t: [] for t in m.task_names}
    m.kinds = {t: "adapter" for t in m.task_names}
    return m


def adapter(m, seed: int, r: int = 8):
    g = torch.Generator().manual_seed(10_000 + seed)
    return {n: (torch.randn(layer.out_features, r, generator=g) * 0.02, torch.randn(r, layer.in_features, generator=g) * 0.02)
            for n, layer in m.layers.items()}


def measure(n: int, k: int, p: int, adds: int, root: Path) -> list[dict]:
    from sharecl.store import save_store

    store = root / f"store-{n}"
    m = build(n - 1, k, p)
    t0 = time.perf_counter()
    manifest = save_store(m, store)
    checkpoint_s = time.perf_counter() - t0
    checkpoint_bytes = manifest["files"]["state"]["bytes"]
    rows = []
    for i in range(adds):
        before = {f.name: f.stat().st_size for f in store.iterdir()}
        t0 = time.perf_counter()
        m.add_adapter(f"new{i}", adapter(m, i), scaling=2.0)
        t1 = time.perf_counter()
        manifest = save_store(m, store)
        t2 = time.perf_counter()
        after = {f.name: f.stat().st_size for f in store.iterdir()}
        written = sum(s for f, s in after.items() if f not in before) + after["manifest.json"]
        rows.append({"n": n, "tasks": len(m.task_names), "merge_s": t1 - t0, "write_s": t2 - t1, "add_s": t2 - t0,
                     "bytes_written": written, "kind": "log" if manifest["files"]["log"] else "checkpoint",
                     "log_files": len(manifest["files"]["log"]), "checkpoint_bytes": manifest["files"]["state"]["bytes"],
                     "first_checkpoint_s": checkpoint_s, "first_checkpoint_bytes": checkpoint_bytes})
        print(f"n={n}: add {i + 1}/{adds}: {rows[-1]['add_s']:.3f} s, {written:,} B ({rows[-1]['kind']})", flush=True)
    coeffs = root / f"coeffs-{n}.safetensors"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", LOAD, str(store), str(coeffs)], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    from safetensors.torch import load_file

    back = load_file(str(coeffs))
    same = all(torch.equal(back[f"{name}.{s}"], getattr(layer, f"coeff_{s}")) for name, layer in m.layers.items() for s in "BA")
    for r in rows:
        r.update(load_s=loaded["load_s"], model_load_s=loaded["model_load_s"], load_peak_rss_mb=loaded["peak_rss_mb"], reload_bitwise_equal=same,
                 child_rss_before_mb=before / 1024)
    shutil.rmtree(store)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="10,100,1000,10000")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--p", type=int, default=4)
    ap.add_argument("--adds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tmp", default=None, help="Directory for the stores (default: a temporary one).")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = Path(tempfile.mkdtemp(dir=a.tmp, prefix="sharecl-store-scale-"))
    rows = []
    try:
        for n in [int(t) for t in a.tasks.split(",")]:
            rows += measure(n, a.k, a.p, a.adds, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    summary = []
    for n in sorted({r["n"] for r in rows}):
        rs = [r for r in rows if r["n"] == n]
        logs = [r for r in rs if r["kind"] == "log"] or rs
        summary.append({"n": n, "add_s_median": sorted(r["add_s"] for r in logs)[len(logs) // 2],
                        "merge_s_median": sorted(r["merge_s"] for r in logs)[len(logs) // 2],
                        "bytes_per_append": sorted(r["bytes_written"] for r in logs)[len(logs) // 2],
                        "appends": sum(r["kind"] == "log" for r in rs), "checkpoints": sum(r["kind"] != "log" for r in rs),
                        "checkpoint_mb": rs[-1]["checkpoint_bytes"] / 2**20, "load_s": rs[0]["load_s"],
                        "model_load_s": rs[0]["model_load_s"],
                        "load_peak_rss_mb": rs[0]["load_peak_rss_mb"], "reload_bitwise_equal": rs[0]["reload_bitwise_equal"]})
    cols = ["n", "add_s_median", "merge_s_median", "bytes_per_append", "appends", "checkpoints", "checkpoint_mb", "load_s",
            "model_load_s", "load_peak_rss_mb", "reload_bitwise_equal"]
    print(f"\nShare store on MiniLM (12 layers of 384², k={a.k}, p={a.p}, adapters of rank 8), {a.threads} thread(s):")
    print(table(summary, cols))
    print(write(f"store_scale-k{a.k}-p{a.p}", {"k": a.k, "p": a.p, "threads": a.threads, "adds": a.adds,
                                               "summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
