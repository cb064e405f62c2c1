"""Share's small-space merge versus a naive SVD of the full stack (METHODS.md §1, [ours]).

One merge of a new task into a subspace that already holds T tasks, on MiniLM's layer
shapes (d_out = d_in = 384), for the 12 query/value layers of all-MiniLM-L6-v2. Both
functions return the same bases and coefficients (tests/test_subspace.py checks it).
``share_s`` is what :class:`~sharecl.methods.share.ShareMethod` does per merge in a stream of
merges (the (T+1)-th after an untimed T-th, so what a previous merge leaves cached is warm, as in
``sharecl add-adapter`` after ``add-adapter``): the merge with the Gram matrices the previous merge
left (no re-projection inside it), reading old tasks only
through the layers' coefficient logs (:mod:`sharecl.coeff_log`), and the logs' new entries: all a
store needs to append. ``ready_s`` adds the first use after it: every old task's coefficients
materialised in the new basis for inference (``O(T·k²·p)``, done lazily on first use).

    python benchmarks/bench_merge.py [--tasks 10,100,1000] [--k 32] [--p 8] [--threads 1]
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


def time_share_path(args, k, p, reps):
    """Per merge as ShareMethod runs it: 12 ShareLinear layers holding the state, kept Grams."""
    from torch import nn

    from sharecl.adapters.share import ShareLinear
    from sharecl.coeff_log import CoefficientLog

    U, V, cB, cA, B, A = args
    best = float("inf")
    for _ in range(reps):
        layers = []
        for _layer in range(LAYERS):
            layer = ShareLinear(nn.Linear(D, D), scaling=1.0, p=p)
            layer.load_logs(U, V, CoefficientLog(cB.clone()), CoefficientLog(cA.clone()))
            layer.merge_grams()
            layers.append(layer)
        g = torch.Generator().manual_seed(1)
        for layer in layers:  # one untimed merge first: the caches a stream of merges keeps warm (Grams, checkpoint rows)
            res = merge_subspace(layer.U, layer.V, layer.log_B, layer.log_A, torch.randn(D, p, generator=g),
                                 torch.randn(p, D, generator=g), p=p, k=k, grams=layer.merge_grams(), reproject=False)
            layer.apply_merge(res)
        t0 = time.perf_counter()
        for layer in layers:
            res = merge_subspace(layer.U, layer.V, layer.log_B, layer.log_A, B, A, p=p, k=k, grams=layer.merge_grams(),
                                 reproject=False)
            layer.apply_merge(res)
        t1 = time.perf_counter()
        for layer in layers:  # first use after the merge: every task's coefficients in the new basis
            layer.mixing_matrices()  # reads coeff_B and coeff_A
        t2 = time.perf_counter()
        if t1 - t0 < best:
            best, ready = t1 - t0, t2 - t0
    return best, ready


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
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--naive-max", type=int, default=100, help="Largest T for the dense reference (slow).")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for T in [int(t) for t in a.tasks.split(",")]:
        args = state_with(T, a.k, a.p)
        share, ready = time_share_path(args, a.k, a.p, a.reps)
        small = time_merge(merge_subspace, args, a.k, a.p, a.reps)
        naive = time_merge(naive_merge_subspace, args, a.k, a.p, 1) if T <= a.naive_max else None
        rows.append({"tasks": T, "share_s": share, "ready_s": ready, "small_space_s": small, "naive_s": naive,
                     "speedup": naive / small if naive else None})
        print(f"T={T}: share {share:.4f} s, small {small:.4f} s, naive {naive} s", flush=True)
    text = table(rows, ["tasks", "share_s", "ready_s", "small_space_s", "naive_s", "speedup"])
    print(f"\nOne merge into {LAYERS} layers of {D}x{D}, k={a.k}, p={a.p}, {a.threads} thread(s) (best of {a.reps}):\n{text}")
    print(write("merge", {"k": a.k, "p": a.p, "layers": LAYERS, "d": D, "threads": a.threads, "rows": rows}))


if __name__ == "__main__":
    main()
