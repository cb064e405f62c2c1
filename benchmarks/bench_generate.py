"""Generating for many tasks from one causal LM: Share's per-row gather against PEFT's ``adapter_names``.

The packaged SmolLM2-135M-Instruct (LoRA targets q_proj and v_proj of all 30 layers). Stores of
1, 8 and 50 **adapter-only tasks** folded into Share (k = 32, p = 8) from random rank-8 LoRA
factors with the scale of trained ones (no task was trained here: decoding cost does not depend
on what an adapter learned). PEFT serves the same tasks, each exported exactly (rank p).

Part 1 — decoding cost per token without HTTP: a batch of ``--rows`` gen5 test prompts, each row
forced to ``--new-tokens`` greedy tokens (``min_new_tokens``), median over ``--reps`` rounds:

- ``base``: the frozen model, no adapter (the floor);
- ``share-folded``: one task's ΔW folded into the weights (zero overhead by construction);
- ``share`` single (every row task 0, one task's ``M_t``) and mixed (each row a random task:
  every layer gathers the row's ``M_t``, one rank-k adapter's cost);
- ``peft`` single (``set_adapter``) and mixed (``generate(adapter_names=[...])``: PEFT runs
  every distinct adapter of the batch on its rows, in a loop per layer).

Part 2 — ``sharecl serve`` over loopback (uvicorn in its own process, the same app and
micro-batcher for both backends), ``--clients`` closed-loop clients each sending one prompt per
request with ``max_new_tokens = --http-new-tokens``: generated tokens/s, p50/p99 latency, for
single-task and mixed-task traffic.

    python benchmarks/bench_generate.py [--threads 2] [--precision fp32|bf16] [--skip-http]
    python benchmarks/bench_generate.py --store STORE --peft-adapters DIR --out generate-lm-adapters  # trained tasks
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("SHARECL_CACHE", Path.home() / ".cache" / "sharecl")) / "bench-generate"
COUNTS = (1, 8, 50)


def store_with_tasks(n: int) -> Path:
    """A Share store on SmolLM2 holding ``n`` adapter-only tasks (built once, cached)."""
    from bench_serve import random_factors  # random rank-8 factors with the scale of trained ones
    from sharecl.generation.lm import load_causal_lm
    from sharecl.methods.share import ShareMethod
    from sharecl.store import save_store

    path = CACHE / f"smollm2-share-{n}"
    if not (path / "manifest.json").exists():
        m = ShareMethod(load_causal_lm(), seed=0, k=32, p=8, r=8)
        g = torch.Generator().manual_seed(1)
        for i in range(n):
            m.add_adapter(f"adapter-{i:03d}", random_factors(m, g), scaling=2.0)
        save_store(m, path)
    return path


class PeftGenerator:
    """Every task of a Share store as an exact PEFT LoRA adapter (rank p) on a fresh copy of the
    base model; mixed batches through ``generate(adapter_names=[...])``. Quacks like a method for
    the server (``encoder``, ``name``, ``task_names``, ``mixed_generate``)."""

    name = "peft-lora"

    def __init__(self, store: Path, precision: str = "fp32", adapters: Path | None = None):
        from peft import LoraConfig, PeftModel, get_peft_model

        from sharecl.generation.lm import load_causal_lm
        from sharecl.store import load_store

        share = load_store(store)
        lm = load_causal_lm(share.encoder.path, max_length=share.encoder.max_length, precision=precision)
        p, s = share.config.p, share.config.scaling
        cfg = LoraConfig(r=p, lora_alpha=s * p, target_modules=list(share.layers), lora_dropout=0.0)
        model = None
        for t in share.task_names:
            if adapters is not None:  # the original adapter, one folder per task
                if not (adapters / t / "adapter_config.json").exists():
                    raise SystemExit(f"--peft-adapters {adapters}: no PEFT adapter for task {t!r} ({adapters / t})")
                if model is None:
                    model = PeftModel.from_pretrained(lm.model, str(adapters / t), adapter_name=t)
                else:
                    model.load_adapter(str(adapters / t), adapter_name=t)
                continue
            if model is None:
                model = get_peft_model(lm.model, cfg, adapter_name=t)
            else:
                model.add_adapter(t, cfg)
            i = share.index(t)
            with torch.no_grad():
                for lname, layer in share.layers.items():
                    B, A = layer.task_factors(i)
                    mod = model.base_model.model.get_submodule(lname)
                    mod.lora_A[t].weight.copy_(A)
                    mod.lora_B[t].weight.copy_(B)
        assert model is not None, "a store holds at least one task"
        lm.model = model.eval()
        self.encoder, self.task_names, self.task_classes = lm, list(share.task_names), dict(share.task_classes)
        self.heads = share.heads

    @torch.no_grad()
    def mixed_generate(self, prompts: list, task_names: list[str], max_new_tokens: list[int], **kw) -> list[list[int]]:
        ids = self.encoder.generate_ids(list(prompts), max_new_tokens=max(max_new_tokens), adapter_names=list(task_names), **kw)
        return [row[:n] for row, n in zip(ids, max_new_tokens)]


def serve_process(backend: str, store: str, port: int, precision: str, threads: int, adapters: Path | None = None) -> None:
    """Run the HTTP server (the same app and batcher for both backends)."""
    import uvicorn

    from sharecl.serve import Loaded, ServeConfig, StoreWatcher, create_app

    torch.set_num_threads(threads)
    watcher = StoreWatcher(store, interval_s=0)
    cur = watcher.current
    cur.method.encoder.precision = precision
    if backend == "peft":
        watcher._current = Loaded(cur.version, PeftGenerator(Path(store), precision, adapters), cur.classes, cur.kinds, cur.has_head,
                                  cur.signature)
    cfg = ServeConfig(port=port, max_batch_size=16, max_inputs=16, max_wait_ms=5, max_new_tokens=64)
    uvicorn.run(create_app(watcher, cfg), host="127.0.0.1", port=port, log_level="error")


# ---------------------------------------------------------------- decoding, no HTTP
def bench_decode(store: Path, prompts: list[str], args) -> list[dict]:
    """Seconds per forced-length greedy generate of ``args.rows`` prompts, per backend and load."""
    from sharecl.store import load_store

    share = load_store(store, precision=args.precision)
    peft = PeftGenerator(store, args.precision, args.peft_adapters)
    tasks = share.task_names
    rng = random.Random(0)
    xs = [prompts[i % len(prompts)] for i in range(args.rows)]
    loads = {"single": [tasks[0]] * args.rows, "mixed": [rng.choice(tasks) for _ in range(args.rows)]}
    folded = share.folded_model(tasks[0])
    n = args.new_tokens
    force = {"min_new_tokens": n}

    def base():
        with share.router.nowhere():
            share.encoder.generate_ids(xs, max_new_tokens=n, **force)

    def share_folded():
        live, share.encoder.model = share.encoder.model, folded
        try:
            with share.router.nowhere():
                share.encoder.generate_ids(xs, max_new_tokens=n, **force)
        finally:
            share.encoder.model = live

    def share_single():
        with share.task(tasks[0]):
            share.encoder.generate_ids(xs, max_new_tokens=n, **force)

    runs = {("base", "-"): base, ("share-folded", "single"): share_folded, ("share", "single"): share_single,
            ("share", "mixed"): lambda: share.mixed_generate(xs, loads["mixed"], [n] * len(xs)),
            ("peft", "single"): lambda: (peft.encoder.model.set_adapter(tasks[0]), peft.encoder.generate_ids(xs, max_new_tokens=n, **force)),
            ("peft", "mixed"): lambda: peft.mixed_generate(xs, loads["mixed"], [n] * len(xs), **force)}
    times = {key: [] for key in runs}
    for _ in range(args.reps + 1):  # interleaved; the first round warms up
        for key, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    out = []
    base_s = statistics.median(times[("base", "-")][1:])
    for (b, ld), v in times.items():
        sec = statistics.median(v[1:])
        out.append({"backend": b, "tasks": len(tasks), "load": ld, "generate_s": sec, "tokens_per_s": len(xs) * n / sec,
                    "ms_per_step": 1000 * sec / n, "over_base": sec / base_s})
    share_mixed = next(r for r in out if r["backend"] == "share" and r["load"] == "mixed")["generate_s"]
    for r in out:
        r["this_over_share_mixed"] = r["generate_s"] / share_mixed
    return out


# ------------------------------------------------------------------------------ HTTP
def run_load(url: str, tasks: list[str], prompts: list[str], mixed: bool, requests: int, clients: int, new_tokens: int) -> dict:
    import httpx

    lat, tokens, errors, lock = [], [0], [], threading.Lock()
    counter = iter(range(requests))

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(timeout=300) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                task = rng.choice(tasks) if mixed else tasks[0]
                body = {"task": task, "inputs": [rng.choice(prompts)], "max_new_tokens": new_tokens}
                t0 = time.perf_counter()
                r = c.post(f"{url}/generate", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        lat.append(dt)
                        tokens[0] += sum(g["tokens"] for g in r.json()["generations"])
                    else:
                        errors.append(r.status_code)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"tokens_per_s": tokens[0] / wall, "requests_per_s": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": len(errors), "requests": len(lat),
            "tokens": tokens[0]}


def bench_server(backend: str, store: Path, prompts: list[str], args) -> list[dict]:
    import httpx

    from _common import wait_healthy
    from bench_serve import _free_port

    port = _free_port()
    extra = ["--peft-adapters", str(args.peft_adapters)] if args.peft_adapters else []
    proc = subprocess.Popen([sys.executable, __file__, "--serve", backend, "--store", str(store), "--port", str(port),
                             "--precision", args.precision, "--threads", str(args.threads), *extra],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 600, f"{backend} server")
        tasks = [t["name"] for t in httpx.get(f"{url}/tasks").json()["tasks"]]
        run_load(url, tasks, prompts, True, args.clients, args.clients, args.http_new_tokens)  # warm-up
        rows = []
        for load in ("single", "mixed"):
            r = run_load(url, tasks, prompts, load == "mixed", args.requests, args.clients, args.http_new_tokens)
            rows.append({"backend": backend, "tasks": len(tasks), "load": load, **r})
            print(rows[-1], flush=True)
        return rows
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (each server process too)")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rows", type=int, default=8, help="prompts per generate call (part 1)")
    ap.add_argument("--new-tokens", type=int, default=32, help="tokens forced per row (part 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--http-new-tokens", type=int, default=16)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, default=None,
                    help="benchmark this Share store alone instead of the random-factor ones (e.g. the store of fifty "
                         "folded trained LoRAs that bench_lm_adapters.py writes)")
    ap.add_argument("--peft-adapters", type=Path, default=None,
                    help="with --store: PEFT serves these original adapters (DIR/<task>/adapter_config.json) instead of "
                         "the store's tasks exported exactly")
    ap.add_argument("--out", default=None, help="results/<out>.json (default generate-<precision>)")
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    if a.serve:
        return serve_process(a.serve, str(a.store), a.port, a.precision, a.threads, a.peft_adapters)
    from _common import table, write
    from sharecl.data.streams import get_stream

    torch.set_num_threads(a.threads)
    prompts = [p for t in get_stream("gen5", seed=0) for p, _ in t.test_inputs[:8]]
    if a.peft_adapters and not a.store:
        raise SystemExit("--peft-adapters names the originals of a --store's tasks; give --store too")
    stores = [a.store] if a.store else [store_with_tasks(n) for n in COUNTS]
    decode = []
    for store in stores:
        decode += bench_decode(store, prompts, a)
        print(table(decode[-6:], ["backend", "tasks", "load", "generate_s", "tokens_per_s", "ms_per_step", "over_base",
                                  "this_over_share_mixed"]), flush=True)
    rows = []
    for store in () if a.skip_http else stores:
        for backend in ("share", "peft"):
            rows += bench_server(backend, store, prompts, a)
    for r in rows:
        same = {x["backend"]: x for x in rows if x["tasks"] == r["tasks"] and x["load"] == r["load"]}
        own_single = next(x for x in rows if x["tasks"] == r["tasks"] and x["backend"] == r["backend"] and x["load"] == "single")
        r["vs_own_single"] = r["tokens_per_s"] / own_single["tokens_per_s"]
        r["share_over_peft"] = same["share"]["tokens_per_s"] / same["peft"]["tokens_per_s"]
    cols = ["backend", "tasks", "load", "generate_s", "tokens_per_s", "ms_per_step", "over_base", "this_over_share_mixed"]
    print(table(decode, cols))
    if rows:
        print(table(rows, ["backend", "tasks", "load", "tokens_per_s", "requests_per_s", "p50_ms", "p99_ms", "vs_own_single",
                           "share_over_peft", "errors"]))
    tasks = (f"the tasks of the store {a.store.name}" + ("; PEFT serves their original adapters" if a.peft_adapters else "")
             if a.store else "adapter-only, random rank-8 LoRA factors (none trained)")
    print(write(a.out or f"generate-{a.precision}", {"threads": a.threads, "precision": a.precision, "rows": a.rows,
                                            "new_tokens": a.new_tokens, "reps": a.reps, "requests": a.requests,
                                            "clients": a.clients, "http_new_tokens": a.http_new_tokens,
                                            "tasks": tasks,
                                            "decode": decode, "http": rows}))


if __name__ == "__main__":
    main()
