"""`sharecl serve` under faults: a poisoned request in a batch, a broken new store version,
hostile images, and a too-large body sent by a client that writes before it reads."""

import base64
import io
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import free_port, make_task
from sharecl.serve import MicroBatcher, ServeConfig, StoreWatcher, create_app
from sharecl.store import read_manifest
from test_serve import served_store  # noqa: F401 - the module-scoped store fixture


class _Poisoned:
    """A method whose forward raises when a batch contains the input ``"POISON"``."""

    def __init__(self, method):
        self.method, self.name = method, method.name
        self.encoder, self.heads = method.encoder, method.heads

    def mixed_logits(self, inputs, tasks):
        if "POISON" in inputs:
            raise RuntimeError("this row breaks the forward")
        return self.method.mixed_logits(inputs, tasks)


def test_a_poisoned_request_fails_alone_in_its_micro_batch(served_store):
    import dataclasses

    good = StoreWatcher(served_store, interval_s=0).current
    loaded = dataclasses.replace(good, method=_Poisoned(good.method))
    xs = make_task("a").test_inputs[:2]
    # the batch closes when its 6 rows are in (never on the timer, even on a loaded machine)
    b = MicroBatcher(lambda: loaded, max_batch_size=6, max_wait_ms=30_000)
    futs = [b.submit("a", xs), b.submit("b", ["POISON"]), b.submit("a", xs[:1]), b.submit("b", xs)]
    with pytest.raises(RuntimeError, match="breaks the forward"):
        futs[1].result(timeout=120)
    got = [futs[i].result(timeout=120)[1] for i in (0, 2, 3)]
    b.close()  # the batcher thread is done before this thread uses the same model
    want = {t: good.method.logits(xs, t).softmax(-1) for t in "ab"}
    torch.testing.assert_close(got[0], want["a"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], want["a"][:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[2], want["b"], atol=1e-5, rtol=0)
    assert b.isolated == 1  # the four requests shared one failed forward, then ran one by one


def test_through_the_app_healthy_neighbours_get_200(served_store):
    import dataclasses
    import threading

    watcher = StoreWatcher(served_store, interval_s=0)
    watcher._current = dataclasses.replace(watcher.current, method=_Poisoned(watcher.current.method))
    statuses = {}
    with TestClient(create_app(watcher, ServeConfig(max_batch_size=6, max_inputs=1, max_wait_ms=30_000))) as c:
        def post(key, inputs):
            statuses[key] = c.post("/predict", json={"task": "a", "inputs": inputs}).status_code

        threads = [threading.Thread(target=post, args=(i, ["POISON"] if i == 2 else [f"text {i}"])) for i in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert c.get("/health").json()["isolated_batches"] >= 1
    assert statuses == {0: 200, 1: 200, 2: 503, 3: 200, 4: 200, 5: 200}


@pytest.mark.multiprocess
def test_a_broken_new_version_is_logged_once_backed_off_and_the_old_one_keeps_serving(served_store, tmp_path, monkeypatch):
    import sharecl.serve.watcher as watcher_mod

    store = tmp_path / "store"
    shutil.copytree(served_store, store)
    logs, loads = [], []
    real_load = watcher_mod._load
    monkeypatch.setattr(watcher_mod, "_load", lambda *a: (loads.append(1), real_load(*a))[1])
    w = StoreWatcher(store, interval_s=1.0, log=logs.append)
    mf = store / "manifest.json"
    m = json.loads(mf.read_text())
    m["version"], m["files"]["state"]["name"] = 2, "state-v2.safetensors"  # points at a file that does not exist
    mf.write_text(json.dumps(m))
    t0, n0 = time.monotonic(), len(loads)
    assert not w.check(now=t0) and w.current.version == 1
    for dt in (0.1, 0.5, 0.9):  # inside the first back-off (1 s): no new attempt
        assert not w.check(now=t0 + dt)
    assert len(loads) - n0 == 1
    assert not w.check(now=t0 + 1.01)  # second attempt, then the wait doubles (to 2 s)
    assert not w.check(now=t0 + 2.5) and len(loads) - n0 == 2
    assert not w.check(now=t0 + 3.1) and len(loads) - n0 == 3
    assert w.reload_error["attempts"] == 3 and len(logs) == 1 and "still serving version 1" in logs[0]
    with TestClient(create_app(w, ServeConfig())) as c:
        h = c.get("/health").json()
        assert h["status"] == "stale" and h["store_version"] == 1 and "missing" in h["reload_error"]["error"]
        assert c.post("/predict", json={"task": "a", "inputs": ["x"]}).status_code == 200
    shutil.rmtree(store)  # a repaired store (a new manifest) is tried at once
    shutil.copytree(served_store, store)
    m = read_manifest(store)
    m["version"] = 5
    (store / "manifest.json").write_text(json.dumps(m))
    assert w.check(now=t0 + 3.2) and w.current.version == 5 and w.reload_error is None


def test_an_unchanged_base_model_is_hashed_once(tiny_model_dir, tmp_path, monkeypatch):
    import sharecl.backbone as backbone

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    calls = []
    real = backbone.sha256_files
    monkeypatch.setattr(backbone, "sha256_files", lambda files: (calls.append(1), real(files))[1])
    first = backbone.weights_hash(model)
    assert backbone.weights_hash(model) == first and len(calls) == 1
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))  # rewritten: new mtime, so hashed again
    assert backbone.weights_hash(model) != first and len(calls) == 2


# -- hostile images ---------------------------------------------------------------------
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _png_header(w: int, h: int) -> bytes:
    """A PNG whose header declares ``w × h`` grey pixels, with one tiny compressed row (a bomb's shape)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _hostile_images() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    jpeg = io.BytesIO()
    noise.save(jpeg, format="JPEG")
    ok_png = _png(noise)
    out = [
        ("16777216x1 header", _png_header(16_777_216, 1)),
        ("1x100000 header", _png_header(1, 100_000)),
        ("65535x65535 header", _png_header(65_535, 65_535)),
        ("5000x5000 header", _png_header(5000, 5000)),
        ("4000x40 real", _png(Image.new("L", (4000, 40)))),  # aspect 100
        ("truncated png", ok_png[: len(ok_png) // 2]),
        ("truncated jpeg", jpeg.getvalue()[:300]),
        ("png + zip polyglot", ok_png + b"PK\x03\x04" + bytes(100)),
        ("gif/js polyglot", b"GIF89a/*\x01\x00\x01\x00\x00\x00\x00;*/=1;alert(1)//"),
        ("postscript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"),
        ("empty", b""),
        ("random", rng.integers(0, 256, 500, dtype=np.uint8).tobytes()),
        ("svg", b"<svg xmlns='http://www.w3.org/2000/svg' width='99999' height='99999'/>"),
        ("zero-size header", _png_header(0, 0)),
    ]
    return out


@pytest.fixture(scope="module")
def vision_store(tmp_path_factory, tiny_vit_dir):
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.store import save_store
    from sharecl.train import TrainConfig
    from test_vision import _bright_dark

    d = tmp_path_factory.mktemp("vision-serve")
    m = ShareMethod(load_encoder(tiny_vit_dir, image_size=28), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    m.learn(_bright_dark("shade", 0), TrainConfig(steps=4, batch_size=8, lr=1e-2, head_lr=1e-2), progress=False)
    save_store(m, d / "s")
    return d / "s"


def test_hostile_images_get_4xx_and_memory_stays_bounded(vision_store):
    b64 = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    big = _png(Image.new("L", (4000, 4000), 128))  # 16 M pixels (accepted): about 16 KB of PNG
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with TestClient(create_app(StoreWatcher(vision_store, interval_s=0), ServeConfig(max_body_bytes=4_000_000))) as c:
        for name, raw in _hostile_images():
            r = c.post("/predict", json={"task": "shade", "inputs": [b64(raw)]})
            if name == "png + zip polyglot":  # a valid PNG with bytes after IEND: it is an image
                assert r.status_code == 200, r.text
                continue
            assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
            assert r.json()["error"]["code"] in ("image_too_large", "invalid_image"), name
        for name in ("16777216x1 header", "65535x65535 header", "4000x40 real"):
            r = c.post("/predict", json={"task": "shade", "inputs": [b64(dict(_hostile_images())[name])]})
            assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", name
        r = c.post("/predict", json={"task": "shade", "inputs": [b64(big)] * 16})  # many large images in one body
        assert r.status_code == 200 and len(r.json()["predictions"]) == 16
        assert c.get("/health").status_code == 200
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    # sixteen 4000² images decoded at once would take 16 × 48 MB; two decode threads hold at most two
    assert grown < 400 << 20, f"peak RSS grew by {grown / 2**20:.0f} MiB"


def test_a_large_image_is_decoded_small_and_like_the_command_line(vision_store, tmp_path):
    from sharecl.data.image_files import read_image
    from sharecl.store import load_store
    from sharecl.vision.decode import decode_image

    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (600, 900, 3), dtype=np.uint8))
    img.save(tmp_path / "x.jpg")
    raw = (tmp_path / "x.jpg").read_bytes()
    a = decode_image(raw, 28)
    assert a.shape == (28, 42, 3) and a.dtype == np.uint8
    assert np.array_equal(read_image(tmp_path / "x.jpg", max_side=28), a)
    m = load_store(vision_store)
    with TestClient(create_app(StoreWatcher(vision_store, interval_s=0), ServeConfig())) as c:
        r = c.post("/predict", json={"task": "shade", "inputs": [base64.b64encode(raw).decode()]})
        assert r.status_code == 200
        torch.testing.assert_close(torch.tensor(r.json()["predictions"][0]["probabilities"]),
                                   m.logits([a], "shade").softmax(-1)[0], atol=1e-5, rtol=0)


# -- a real server: a too-large body read by a client that writes first -------------------
@pytest.mark.multiprocess
def test_urllib_client_reads_the_413_of_a_10_mb_body(served_store):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sharecl", "serve", str(served_store), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        body = json.dumps({"task": "a", "inputs": ["x" * 10_000_000]}).encode()
        for _ in range(3):
            req = urllib.request.Request(f"{url}/predict", data=body, headers={"content-type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as info:
                urllib.request.urlopen(req, timeout=30)
            assert info.value.code == 413 and json.loads(info.value.read())["error"]["code"] == "body_too_large"
        with urllib.request.urlopen(urllib.request.Request(
                f"{url}/predict", data=json.dumps({"task": "a", "inputs": ["fine"]}).encode(),
                headers={"content-type": "application/json"}), timeout=30) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=20)
