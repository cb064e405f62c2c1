"""A fault soak: stores under SIGKILL, servers under hostile traffic.

Part 1 — ``--kills`` SIGKILLs of ``sharecl learn`` at uniformly random instants (from process
start to the end of a full run, measured per method), spread over a store of every storable
method (Share, InfLoRA, SD-LoRA, SD-LoRA-RR, SD-LoRA-KD, DualLoRA) on the packaged MiniLM with
real text5 tasks. Each store holds task ``a`` (version 1); the killed ``learn`` adds task ``b``.
After each kill the store is loaded and every task it holds predicts on fixed inputs:
task ``a`` must predict exactly as before the kill, task ``b`` (if the kill came after the
manifest's rename) exactly as an unkilled run of the same command. Counted: kills, unloadable
stores, tasks lost (a task missing, or predicting anything but its own logits), versions seen.

Part 2 — ``--requests`` fuzzed HTTP requests to two real ``sharecl serve`` processes over
loopback (a text store and a vision store on the packaged DINOv2), from 4 client threads:
random JSON of every type, malformed and truncated JSON, invalid UTF-8, deep nesting, huge
bodies (with and without a content length), wrong methods and paths, unknown tasks, texts
over the limit, and for the vision server hostile images (extreme aspect ratios, headers
declaring 16,777,216 × 1 or 65,535² pixels, truncated and polyglot files, PostScript, many large
images in one body). Counted: requests, status classes, 5xx, connection errors; peak RSS of
each server process (sampled every 50 ms).

    python benchmarks/bench_faults.py [--kills 102] [--requests 10000] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import table, write  # noqa: E402

METHODS = ["share", "inflora", "sd-lora", "sd-lora-rr", "sd-lora-kd", "dual-lora"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _csv(path: Path, task) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for x, y in zip(task.train_inputs + task.test_inputs, task.train_labels + task.test_labels):
            w.writerow([x, task.classes[y]])
    return path


def _learn(store: Path, task: str, data: Path, steps: int, extra=()) -> list[str]:
    return [sys.executable, "-m", "sharecl", "learn", str(store), "--task", task, "--data", str(data),
            "--steps", str(steps), "--no-progress", *extra]


def _predictions(store: Path, inputs: list[str]) -> dict:
    import torch

    from sharecl.store import load_store

    m = load_store(store)
    with torch.no_grad():
        return {t: m.logits(inputs, t) for t in m.task_names}


def kill_soak(kills: int, seed: int, steps: int, work: Path) -> dict:
    import torch

    from sharecl.data.streams import get_stream
    from sharecl.store import read_manifest

    rng = random.Random(seed)
    stream = get_stream("text5", seed=seed, train_per_class=16, test_per_class=4)
    a, b = _csv(work / "a.csv", stream.tasks[0]), _csv(work / "b.csv", stream.tasks[1])
    probe = stream.tasks[0].test_inputs[:4] + stream.tasks[1].test_inputs[:4]
    rows, per_method = [], {}
    for method in METHODS:
        base = work / f"{method}-v1"
        subprocess.run(_learn(base, "a", a, steps, ["--method", method]), env=ENV, check=True, capture_output=True)
        full = work / f"{method}-v2"
        shutil.copytree(base, full)
        t0 = time.perf_counter()
        subprocess.run(_learn(full, "b", b, steps), env=ENV, check=True, capture_output=True)
        per_method[method] = {"full_run_s": time.perf_counter() - t0, "v1": _predictions(base, probe),
                              "v2": _predictions(full, probe)}
        print(f"{method}: a full `learn` takes {per_method[method]['full_run_s']:.1f} s", flush=True)
    for i in range(kills):
        method = METHODS[i % len(METHODS)]
        ref = per_method[method]
        store = work / "victim"
        if store.exists():
            shutil.rmtree(store)
        shutil.copytree(work / f"{method}-v1", store)
        delay = rng.uniform(0.0, ref["full_run_s"])
        proc = subprocess.Popen(_learn(store, "b", b, steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        row = {"kill": i, "method": method, "delay_s": round(delay, 3), "finished_before_kill": finished}
        try:
            version = read_manifest(store)["version"]
            got = _predictions(store, probe)
            row["version"] = version
            want = ref["v1"] if version == 1 else ref["v2"]
            lost = [t for t in want if t not in got or not torch.equal(got[t], want[t])]
            row["tasks_lost"] = len(lost) + len([t for t in got if t not in want])
            row["loadable"] = True
        except Exception as exc:  # noqa: BLE001 - an unloadable store is what we count
            row.update(loadable=False, error=f"{type(exc).__name__}: {exc}"[:300], tasks_lost=len(ref["v1"]))
        rows.append(row)
        if (i + 1) % 10 == 0:
            print(f"  {i + 1}/{kills} kills, unloadable {sum(not r['loadable'] for r in rows)}, "
                  f"tasks lost {sum(r['tasks_lost'] for r in rows)}", flush=True)
    by_method = {m: {"kills": sum(r["method"] == m for r in rows),
                     "version_1": sum(r["method"] == m and r.get("version") == 1 for r in rows),
                     "version_2": sum(r["method"] == m and r.get("version") == 2 for r in rows),
                     "full_run_s": round(per_method[m]["full_run_s"], 2)} for m in METHODS}
    return {"kills": len(rows), "unloadable": sum(not r["loadable"] for r in rows),
            "tasks_lost": sum(r["tasks_lost"] for r in rows), "by_method": by_method, "rows": rows}


# --------------------------------------------------------------------------- fuzzing
def _png(w: int, h: int, value: int = 128) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h), value).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2 ** 63, 10 ** 30, rng.randint(-10 ** 6, 10 ** 6)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-308, rng.random()])
    if kind == 4:
        return _random_text(rng, rng.randrange(40))
    if kind == 5:
        return [_random_json(rng, depth + 1) for _ in range(rng.randrange(5))]
    return {_random_text(rng, 6): _random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abc xyz", "\x00\x01\x1b\x7f", "ünïcödé 日本語 🙂", "\u202e\u200b\ufeff", '"\\{}[]', "\ud7ff\ue000"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


class _Fuzzer:
    """One kind of hostile request after another; returns ``(method, path, body bytes, headers)``."""

    def __init__(self, rng: random.Random, tasks: list[str], vision: bool, max_body: int):
        self.rng, self.tasks, self.vision, self.max_body = rng, tasks, vision, max_body
        if vision:
            from PIL import Image

            noise = Image.frombytes("RGB", (48, 48), bytes(rng.randrange(256) for _ in range(48 * 48 * 3)))
            buf = io.BytesIO()
            noise.save(buf, format="JPEG")
            jpg = buf.getvalue()
            self.images = [_png_header(16_777_216, 1), _png_header(1, 100_000), _png_header(65_535, 65_535),
                           _png(4000, 40), jpg[:200], jpg, jpg + b"PK\x03\x04" + bytes(64), _png(64, 64),
                           b"%!PS-Adobe-3.0 EPSF-3.0\nshowpage\n", b"GIF89a/*\x01\x00\x01\x00;*/alert(1)", b"",
                           bytes(rng.randrange(256) for _ in range(300)), _png(2000, 2000)]

    def _input(self):
        r = self.rng
        if self.vision:
            choice = r.randrange(4)
            if choice == 0:
                return _random_text(r, r.randrange(20))  # not base64
            return base64.b64encode(r.choice(self.images)).decode()
        return _random_text(r, r.choice([0, 5, 50, 20_000]))

    def request(self):
        r, kind = self.rng, self.rng.randrange(12)
        json_headers = {"content-type": "application/json"}
        if kind <= 3:  # schema-shaped, hostile values
            body = {"task": r.choice(self.tasks + ["", "nope", "../x", 3, None]),
                    "inputs": [self._input() for _ in range(r.choice([0, 1, 2, 5, 70]))]}
            if r.random() < 0.2:
                body["extra"] = _random_json(r)
            return "POST", "/predict", json.dumps(body).encode(), json_headers
        if kind == 4:
            return "POST", "/predict", json.dumps(_random_json(r)).encode(), json_headers
        if kind == 5:  # malformed or truncated JSON, invalid UTF-8
            good = json.dumps({"task": self.tasks[0], "inputs": ["x"]}).encode()
            return "POST", "/predict", r.choice([good[: r.randrange(len(good))], b"\xff\xfe{", b"{'a': 1}",
                                                  b'{"task": "a", "inputs": ["\xc3\x28"]}', b"NaN", b""]), json_headers
        if kind == 6:  # deep nesting
            d = r.choice([100, 1000, 100_000])
            return "POST", "/predict", b"[" * d + b"]" * d, json_headers
        if kind == 7:  # over the body limit
            return "POST", "/predict", b'{"task": "a", "inputs": ["' + b"z" * (self.max_body + 10) + b'"]}', json_headers
        if kind == 8:  # random bytes, odd content types
            raw = bytes(r.randrange(256) for _ in range(r.randrange(500)))
            return "POST", "/predict", raw, {"content-type": r.choice(["application/json", "text/plain", "multipart/form-data"])}
        if kind == 9:
            return r.choice(["GET", "PUT", "DELETE", "PATCH"]), r.choice(["/predict", "/tasks", "/health", "/x", "/%00", "/" + "a" * 3000]), b"", {}
        if kind == 10:  # a valid request
            return "POST", "/predict", json.dumps({"task": self.tasks[0], "inputs": [self._valid()]}).encode(), json_headers
        return "GET", r.choice(["/health", "/tasks", "/openapi.json"]), b"", {}

    def _valid(self):
        return base64.b64encode(_png(64, 64, self.rng.randrange(256))).decode() if self.vision else "a short valid text"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fuzz_server(store: Path, requests: int, seed: int, vision: bool, tasks: list[str]) -> dict:
    import http.client

    import psutil

    port, max_body = _free_port(), 1_000_000
    proc = subprocess.Popen([sys.executable, "-m", "sharecl", "serve", str(store), "--port", str(port), "--max-inputs", "8",
                             "--max-batch-size", "16", "--max-text-chars", "2000", "--max-body-bytes", str(max_body)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, stop = [0], threading.Event()

    def sample():
        p = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], p.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    deadline = time.time() + 120
    while True:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            raise RuntimeError("server did not start")
        time.sleep(0.3)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    counts: dict[str, int] = {}
    five, conn_errors, lock = [], [0], threading.Lock()

    def client(k: int, n: int):
        fz = _Fuzzer(random.Random(seed * 1000 + k), tasks, vision, max_body)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(n):
            method, path, body, headers = fz.request()
            try:
                conn.request(method, path, body=body or None, headers=headers)
                resp = conn.getresponse()
                resp.read()
                status = resp.status
                if resp.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    conn_errors[0] += 1
                    counts["connection error"] = counts.get("connection error", 0) + 1
                    if conn_errors[0] <= 5:
                        five.append({"path": path, "error": f"{type(exc).__name__}: {exc}"[:200], "body_head": body[:80].decode("latin-1")})
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                continue
            with lock:
                key = f"{status // 100}xx"
                counts[key] = counts.get(key, 0) + 1
                if status >= 500 and len(five) < 20:
                    five.append({"status": status, "path": path, "body_head": body[:120].decode("latin-1")})
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k, requests // 4 + (k < requests % 4))) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    alive = proc.poll() is None
    stop.set()
    proc.terminate()
    proc.wait(timeout=30)
    return {"requests": sum(counts.values()), "by_status": counts, "5xx": counts.get("5xx", 0),
            "connection_errors": conn_errors[0], "server_alive_after": alive, "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak[0] / 2 ** 20, 1), "examples": five}


def vision_store(work: Path) -> Path:
    from sharecl.backbone import load_encoder
    from sharecl.data.streams import get_stream
    from sharecl.methods.share import ShareMethod
    from sharecl.store import save_store
    from sharecl.train import TrainConfig
    from sharecl.vision.convert import default_vit_path

    t = get_stream("fmnist-cil", seed=0, train_per_class=32, test_per_class=8).tasks[0]
    m = ShareMethod(load_encoder(str(default_vit_path()), image_size=56), seed=0)
    m.learn(t, TrainConfig(steps=10, batch_size=16), progress=False)
    save_store(m, work / "vision")
    return work / "vision"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=102)
    ap.add_argument("--requests", type=int, default=10_000, help="fuzzed requests in all (half to each server)")
    ap.add_argument("--steps", type=int, default=10, help="training steps of each killed learn")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sharecl-faults-") as d:
        work = Path(d)
        kills = kill_soak(a.kills, a.seed, a.steps, work)
        text = fuzz_server(work / "share-v2", a.requests // 2, a.seed, False, ["a", "b"])
        vision = fuzz_server(vision_store(work), a.requests - a.requests // 2, a.seed + 1, True, ["fmnist-1"])
    rows = [{"part": "SIGKILL of learn (6 methods)", "count": kills["kills"], "unloadable stores": kills["unloadable"],
             "tasks lost": kills["tasks_lost"]},
            {"part": "fuzz: text server", "count": text["requests"], "5xx": text["5xx"],
             "connection errors": text["connection_errors"], "peak RSS MB": text["peak_rss_mb"]},
            {"part": "fuzz: vision server", "count": vision["requests"], "5xx": vision["5xx"],
             "connection errors": vision["connection_errors"], "peak RSS MB": vision["peak_rss_mb"]}]
    print(table(rows, ["part", "count", "unloadable stores", "tasks lost", "5xx", "connection errors", "peak RSS MB"]))
    print("versions after the kills: " + ", ".join(f"{m}: v1 {v['version_1']}, v2 {v['version_2']}"
                                                    for m, v in kills["by_method"].items()))
    for name, res in (("text", text), ("vision", vision)):
        print(f"{name} server: {res['by_status']}, {res['seconds']} s" + (f"; examples {res['examples'][:3]}" if res["examples"] else ""))
    path = write("faults", {"args": vars(a), "kills": kills, "text_server": text, "vision_server": vision})
    print(f"raw results: {path}")


if __name__ == "__main__":
    main()
