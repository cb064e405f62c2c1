"""Serving many tasks from one model: throughput and latency over loopback HTTP, and store size.

Part 1 — requests/s and p50/p99 latency of ``sharecl serve`` (uvicorn in its own process,
micro-batching on) under closed-loop load from ``--clients`` threads, each request holding
``--rows`` real text5 test texts:

- backends: **share** (Share's mixed-task forward: each row gathers its task's ``M_t``) and
  **peft** (the same tasks as PEFT LoRA adapters — each Share task exported exactly, rank p —
  in PEFT's own mixed batch, ``model(..., adapter_names=[...])``), behind the same server
  and batcher;
- loads: **mixed** (each request for a random task) and **single** (every request for task 0);
- 5 real tasks (all-MiniLM-L6-v2, text5, Share k=10 p=2, 80 steps/task), and 50 tasks (the 5
  plus 45 adapter-only tasks from random rank-8 LoRA factors, with random heads).

Part 2 — the store's size on disk with 5 / 50 / 500 adapter-only tasks (random rank-8 LoRA
factors, fixed k=32, no heads) against the same tasks kept as PEFT LoRA adapters (rank 8),
and the time to add the n-th task (``add_adapter``: the data-free merge) and to write the store.

    python benchmarks/bench_serve.py [--requests 300] [--clients 8] [--rows 4]
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

CACHE = Path(os.environ.get("SHARECL_CACHE", Path.home() / ".cache" / "sharecl")) / "bench-serve"


# ----------------------------------------------------------------------------- stores
def real_store() -> Path:
    """The 5-task text5 Share store (built once, ~2 minutes, cached)."""
    from sharecl.backbone import load_encoder
    from sharecl.data.streams import get_stream
    from sharecl.methods.share import ShareMethod
    from sharecl.store import save_store
    from sharecl.train import TrainConfig

    path = CACHE / "text5-share"
    if not (path / "manifest.json").exists():
        m = ShareMethod(load_encoder(max_length=64), seed=0, k=10, p=2)
        m.begin_stream(5)
        for t in get_stream("text5", seed=0):
            m.learn(t, TrainConfig(steps=80, max_length=64), progress=False)
        save_store(m, path)
    return path


def random_factors(method, g: torch.Generator, r: int = 8) -> dict:
    """Random LoRA factors with the shape and scale of trained ones (B small, A ~ init)."""
    return {n: (torch.randn(lin.out_features, r, generator=g) * 0.02, torch.randn(r, lin.in_features, generator=g) / lin.in_features ** 0.5)
            for n, lin in method.layers.items()}


def store_with_tasks(n: int) -> Path:
    """The real store plus ``n − 5`` adapter-only tasks, each given a random 5-class head."""
    from sharecl.store import load_store, save_store

    path = CACHE / f"text5-share-{n}"
    if not (path / "manifest.json").exists():
        m = load_store(real_store())
        g = torch.Generator().manual_seed(1)
        for i in range(n - len(m.task_names)):
            name = f"synthetic-{i:03d}"
            m.add_adapter(name, random_factors(m, g), scaling=2.0, classes=[f"c{j}" for j in range(5)])
            m.heads.add(name, 5, g)
        save_store(m, path)
    return path


# ---------------------------------------------------------------------- PEFT backend
class PeftBackend:
    """Every task of a Share store as an exact PEFT LoRA adapter (rank p); mixed batches via ``adapter_names``."""

    name = "peft-lora"

    def __init__(self, store: Path):
        from peft import LoraConfig, get_peft_model

        from sharecl.backbone import load_encoder
        from sharecl.store import load_store

        share = load_store(store)
        self.heads, self.task_classes = share.heads, share.task_classes
        self.encoder = load_encoder(share.encoder.path, max_length=share.encoder.max_length)
        p, s = share.config.p, share.config.scaling
        cfg = LoraConfig(r=p, lora_alpha=s * p, target_modules=list(share.layers), lora_dropout=0.0)
        self.model = None
        for t in share.task_names:
            adapter = f"task-{t}"
            if self.model is None:
                self.model = get_peft_model(self.encoder.model, cfg, adapter_name=adapter)
            else:
                self.model.add_adapter(adapter, cfg)
            i = share.index(t)
            with torch.no_grad():
                for lname, layer in share.layers.items():
                    B, A = layer.task_factors(i)
                    mod = self.model.base_model.model.get_submodule(lname)
                    mod.lora_A[adapter].weight.copy_(A)
                    mod.lora_B[adapter].weight.copy_(B)
        self.model.eval()
        self.task_names = share.task_names

    @torch.no_grad()
    def mixed_logits(self, inputs: list, task_names: list) -> list:
        batch = self.encoder.tokenize(inputs)
        h = self.model(**batch, adapter_names=[f"task-{t}" for t in task_names]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        z = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return [self.heads(z[i: i + 1], t)[0] for i, t in enumerate(task_names)]


def serve_process(backend: str, store: str, port: int) -> None:
    """Run the HTTP server (the same app and batcher for both backends)."""
    import uvicorn

    from sharecl.serve import Loaded, ServeConfig, StoreWatcher, create_app

    watcher = StoreWatcher(store, interval_s=0)
    if backend == "peft":
        cur = watcher.current
        watcher._current = Loaded(cur.version, PeftBackend(Path(store)), cur.classes, cur.kinds, cur.has_head, cur.signature)
    uvicorn.run(create_app(watcher, ServeConfig(port=port, max_batch_size=64, max_wait_ms=5)), host="127.0.0.1", port=port,
                log_level="error")


# ------------------------------------------------------------------------------ load
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(url: str, tasks: list[str], texts: list[str], mixed: bool, requests: int, clients: int, rows: int) -> dict:
    import httpx

    lat, errors, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client(seed):
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as c:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                task = rng.choice(tasks) if mixed else tasks[0]
                body = {"task": task, "inputs": rng.sample(texts, rows)}
                t0 = time.perf_counter()
                r = c.post(f"{url}/predict", json=body)
                dt = time.perf_counter() - t0
                with lock:
                    (lat.append(dt) if r.status_code == 200 else errors.append(r.status_code))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat.sort()
    return {"requests_per_s": len(lat) / wall, "rows_per_s": len(lat) * rows / wall, "p50_ms": 1000 * statistics.median(lat),
            "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], "errors": len(errors), "requests": len(lat)}


def bench_server(backend: str, store: Path, args, texts: list[str]) -> list[dict]:
    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", backend, "--store", str(store), "--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        from _common import wait_healthy

        wait_healthy(url, proc, 300, f"{backend} server")
        tasks = [t["name"] for t in httpx.get(f"{url}/tasks").json()["tasks"] if t["predict"]]
        run_load(url, tasks, texts, True, 40, args.clients, args.rows)  # warm-up
        rows = []
        for load in ("single", "mixed", "single", "mixed"):  # interleaved twice; the better of each is kept
            r = run_load(url, tasks, texts, load == "mixed", args.requests, args.clients, args.rows)
            rows.append({"backend": backend, "tasks": len(tasks), "load": load, **r})
            print(rows[-1], flush=True)
        best = {}
        for r in rows:
            if r["load"] not in best or r["requests_per_s"] > best[r["load"]]["requests_per_s"]:
                best[r["load"]] = r
        return [best["single"], best["mixed"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---------------------------------------------------------------- forward pass only
def bench_forward(store: Path, texts: list[str], reps: int, rows: int = 64) -> list[dict]:
    """Seconds per mixed-task forward of ``rows`` texts, no HTTP: Share vs PEFT, interleaved."""
    from sharecl.store import load_store

    share, peft = load_store(store), PeftBackend(store)
    tasks = [t for t in share.task_names if t in share.heads]
    rng = random.Random(0)
    xs = rng.sample(texts, rows)
    loads = {"single": [tasks[0]] * rows, "mixed": [rng.choice(tasks) for _ in range(rows)]}
    times = {(b, ld): [] for b in ("share", "peft") for ld in loads}
    for _ in range(reps + 1):  # the first round warms up
        for (b, ld), acc in times.items():
            backend = share if b == "share" else peft
            t0 = time.perf_counter()
            backend.mixed_logits(xs, loads[ld])
            acc.append(time.perf_counter() - t0)
    out = [{"backend": b, "tasks": len(tasks), "load": ld, "forward_s": statistics.median(v[1:]),
            "rows_per_s": rows / statistics.median(v[1:])} for (b, ld), v in times.items()]
    share_mixed = next(r for r in out if r["backend"] == "share" and r["load"] == "mixed")["forward_s"]
    for r in out:
        r["this_over_share_mixed"] = r["forward_s"] / share_mixed
    return out


# ------------------------------------------------------------------------ store size
def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_store_size(counts=(5, 50, 500)) -> list[dict]:
    from peft import LoraConfig, get_peft_model

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.store import save_store

    out = []
    with tempfile.TemporaryDirectory() as d:
        m = ShareMethod(load_encoder(max_length=64), seed=0, k=32, p=8, r=8)
        g = torch.Generator().manual_seed(2)
        for n in counts:
            while len(m.task_names) < n - 1:
                m.add_adapter(f"t{len(m.task_names):04d}", random_factors(m, g), scaling=2.0)
            t0 = time.perf_counter()  # the n-th task: a data-free merge into every layer ...
            m.add_adapter(f"t{len(m.task_names):04d}", random_factors(m, g), scaling=2.0)
            t_add = time.perf_counter() - t0
            t1 = time.perf_counter()  # ... and the atomic write of the new version
            save_store(m, Path(d) / f"s{n}")
            t_save = time.perf_counter() - t1
            out.append({"tasks": n, "share_store_bytes": dir_bytes(Path(d) / f"s{n}"), "add_task_s": t_add, "save_s": t_save})
        # the same tasks as PEFT LoRA adapters (rank 8): measured for 5, per-adapter size × n beyond
        enc = load_encoder(max_length=64)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(m.layers))
        peft_model = get_peft_model(enc.model, cfg, adapter_name="task-0")
        for i in range(1, 5):
            peft_model.add_adapter(f"task-{i}", cfg)
        peft_dir = Path(d) / "peft"
        peft_model.save_pretrained(str(peft_dir), selected_adapters=[f"task-{i}" for i in range(5)])
        per_adapter = dir_bytes(peft_dir) / 5
        for r in out:
            r["peft_bytes"] = per_adapter * r["tasks"]
            r["peft_measured"] = r["tasks"] == 5
            r["ratio_peft_over_share"] = r["peft_bytes"] / r["share_store_bytes"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--skip-size", action="store_true")
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--forward-reps", type=int, default=10)
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.serve:
        return serve_process(a.serve, a.store, a.port)
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import table, write
    from sharecl.data.streams import get_stream

    texts = [x[:4000] for t in get_stream("text5", seed=0) for x in t.test_inputs]  # the model reads 64 tokens
    forward = []
    for n in (5, 50):
        forward += bench_forward(real_store() if n == 5 else store_with_tasks(n), texts, a.forward_reps)
    print(table(forward, ["backend", "tasks", "load", "forward_s", "rows_per_s", "this_over_share_mixed"]), flush=True)
    rows = []
    for n in () if a.skip_http else (5, 50):
        store = real_store() if n == 5 else store_with_tasks(n)
        for backend in ("share", "peft"):
            rows += bench_server(backend, store, a, texts)
    for n in () if a.skip_http else (5, 50):
        single = {r["backend"]: r for r in rows if r["tasks"] == n and r["load"] == "single"}
        share_mixed = next(r for r in rows if r["tasks"] == n and r["load"] == "mixed" and r["backend"] == "share")
        for r in rows:
            if r["tasks"] == n:
                r["vs_own_single"] = r["requests_per_s"] / single[r["backend"]]["requests_per_s"]
                r["share_mixed_over_this"] = share_mixed["requests_per_s"] / r["requests_per_s"]
    print(table(rows, ["backend", "tasks", "load", "requests_per_s", "rows_per_s", "p50_ms", "p99_ms", "vs_own_single",
                       "share_mixed_over_this", "errors"]))
    sizes = [] if a.skip_size else bench_store_size()
    if sizes:
        print(table(sizes, ["tasks", "share_store_bytes", "peft_bytes", "ratio_peft_over_share", "add_task_s", "save_s"]))
    print(write("serve", {"requests": a.requests, "clients": a.clients, "rows_per_request": a.rows, "forward": forward,
                          "throughput": rows, "store_size": sizes}))


if __name__ == "__main__":
    main()
