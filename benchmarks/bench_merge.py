"""Share's small-space merge versus a naive SVD of the full stack (METHODS.md §1, [ours]).

One merge of a new task into a subspace that already holds T tasks, on MiniLM's layer
shapes (d_out = d_in = 384), for the 12 query/value layers of all-MiniLM-L6-v2. Both
functions return the same bases and coefficients (tests/test_subspace.py checks it).

    python benchmarks/bench_merge.py [--tasks 10,100,1000] [--k 32] [--p 8]
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import table, write
from sharecl.subspace import merge_subspace, naive_merge_subspace

LAYERS, D = 12, 384


def state_with(T: int, k: int, p: int, seed: int = 0):
    """A random orthonormal subspace holding T tasks' coefficients (what T merges leave behind)."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D, k, generator=g, dtype=torch.float64))[0]
    cB = torch.randn(T, k, p, generator=g, dtype=torch.float64)
    cA = torch.randn(T, k, p, generator=g, dtype=torch.float64)
    B, A = torch.randn(D, p, generator=g), torch.randn(p, D, generator=g)
    return U.float(), V.float(), cB.float(), cA.float(), B, A


def time_merge(fn, args, k, p, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _layer in range(LAYERS):
            fn(*args, p=p, k=k)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="10,100,1000")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for T in [int(t) for t in a.tasks.split(",")]:
        args = state_with(T, a.k, a.p)
        small = time_merge(merge_subspace, args, a.k, a.p, a.reps)
        naive = time_merge(naive_merge_subspace, args, a.k, a.p, 1 if T >= 1000 else a.reps)
        rows.append({"tasks": T, "small_space_s": small, "naive_s": naive, "speedup": naive / small})
        print(f"T={T}: small {small:.4f} s, naive {naive:.4f} s", flush=True)
    text = table(rows, ["tasks", "small_space_s", "naive_s", "speedup"])
    print(f"\nOne merge into {LAYERS} layers of {D}x{D}, k={a.k}, p={a.p} (best of {a.reps}):\n{text}")
    print(write("merge", {"k": a.k, "p": a.p, "layers": LAYERS, "d": D, "rows": rows}))


if __name__ == "__main__":
    main()
