"""`sharecl serve`: predictions, mixed-task micro-batching, hot reload, limits, fuzzing, a real server."""

import json
import shutil
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import learn_b, make_task, serving, sharecl
from sharecl.serve import MicroBatcher, ServeConfig, StoreWatcher, create_app
from sharecl.store import load_store, save_store


@pytest.fixture(scope="module")
def served_store(tmp_path_factory, tiny_model_dir):
    """A Share store with data tasks a, b and an adapter-only task z (no head)."""
    from dataclasses import replace

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.train import TrainConfig

    d = tmp_path_factory.mktemp("serve") / "store"
    m = ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    cfg = replace(TrainConfig(steps=8, batch_size=8, lr=1e-2, head_lr=1e-2, max_length=16))
    m.learn(make_task("a"), cfg, progress=False)
    m.learn(make_task("b", seed=1), cfg, progress=False)
    g = torch.Generator().manual_seed(0)
    m.add_adapter("z", {n: (torch.randn(l.out_features, 4, generator=g) * 0.01, torch.randn(4, l.in_features, generator=g) * 0.1)
                        for n, l in m.layers.items()}, scaling=2.0)
    save_store(m, d)
    return d


def client_for(store, **cfg):
    watcher = StoreWatcher(store, interval_s=cfg.pop("reload_interval_s", 0.0), top_tasks=cfg.get("top_tasks"))
    return TestClient(create_app(watcher, ServeConfig(**cfg)))


def test_predict_tasks_health_match_the_method(served_store):
    method = load_store(served_store)
    with client_for(served_store) as c:
        assert c.get("/health").json()["store_version"] == 1
        tasks = {t["name"]: t for t in c.get("/tasks").json()["tasks"]}
        assert tasks["a"]["classes"] == method.task_classes["a"] and tasks["a"]["predict"]
        assert tasks["z"]["kind"] == "adapter" and not tasks["z"]["predict"]
        for name, seed in (("a", 0), ("b", 1)):
            xs = make_task(name, seed=seed).test_inputs
            r = c.post("/predict", json={"task": name, "inputs": xs})
            assert r.status_code == 200, r.text
            body = r.json()
            want = method.logits(xs, name).softmax(-1)
            got = torch.tensor([p["probabilities"] for p in body["predictions"]])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
            assert [p["label"] for p in body["predictions"]] == [method.task_classes[name][i] for i in want.argmax(-1).tolist()]
        assert "/predict" in c.get("/openapi.json").json()["paths"]


def test_concurrent_requests_for_different_tasks_share_forward_passes(served_store):
    method = load_store(served_store)
    xs = {"a": make_task("a").test_inputs[:3], "b": make_task("b", seed=1).test_inputs[:3]}
    want = {t: method.logits(v, t).softmax(-1) for t, v in xs.items()}
    results, errors = [], []
    with client_for(served_store, max_wait_ms=50, max_batch_size=64) as c:
        def worker(i):
            t = "ab"[i % 2]
            r = c.post("/predict", json={"task": t, "inputs": xs[t]})
            (results if r.status_code == 200 else errors).append((t, r))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        health = c.get("/health").json()
    assert not errors and len(results) == 24
    for t, r in results:
        got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
        torch.testing.assert_close(got, want[t], atol=1e-5, rtol=0)
    assert health["rows"] == 24 * 3
    assert health["batches"] < 24  # requests for both tasks were answered together


def test_batcher_never_splits_a_request_and_respects_the_row_limit(served_store):
    loaded = StoreWatcher(served_store, interval_s=0).current
    b = MicroBatcher(lambda: loaded, max_batch_size=5, max_wait_ms=30)
    futs = [b.submit("ab"[i % 2], [f"text {i} {j}" for j in range(3)]) for i in range(6)]
    outs = [f.result(timeout=60) for f in futs]
    b.close()
    assert all(p.shape[0] == 3 for _, p in outs) and b.rows == 18 and b.batches == 6  # 3 + 3 > 5: one request per batch


@pytest.mark.parametrize("body,status,code", [
    ({"task": "nope", "inputs": ["x"]}, 404, "unknown_task"),
    ({"task": "z", "inputs": ["x"]}, 422, "no_head"),
    ({"task": "a", "inputs": "x"}, 422, "invalid_request"),
    ({"task": "a", "inputs": [1, 2]}, 422, "invalid_request"),
    ({"task": "a", "inputs": []}, 422, "invalid_request"),
    ({"task": "a", "inputs": ["x"] * 9}, 422, "invalid_request"),
    ({"task": "a", "inputs": ["x" * 101]}, 422, "invalid_request"),
    ({"task": "a", "inputs": ["x"], "extra": 1}, 422, "invalid_request"),
    ({"task": 3, "inputs": ["x"]}, 422, "invalid_request"),
    ({"inputs": ["x"]}, 422, "no_head"),  # no task id: every task must have a head, and z has none
    ({"task": None, "inputs": ["x"]}, 422, "no_head"),
    ({"task": "", "inputs": ["x"]}, 422, "invalid_request"),
    ([1, 2, 3], 422, "invalid_request"),
])
def test_bad_requests_get_a_4xx_json_error(served_store, body, status, code):
    with client_for(served_store, max_inputs=8, max_text_chars=100) as c:
        r = c.post("/predict", json=body)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["message"]


def test_malformed_oversize_and_unrouted_requests(served_store):
    with client_for(served_store, max_body_bytes=2000) as c:
        r = c.post("/predict", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
        r = c.post("/predict", content=json.dumps({"task": "a", "inputs": ["y" * 3000]}), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():  # no content-length: the limit applies while the body streams in
            yield b'{"task": "a", "inputs": ["'
            for _ in range(10):
                yield b"z" * 500
            yield b'"]}'

        r = c.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/nowhere").status_code == 404 and c.get("/nowhere").json()["error"]["code"] == "http_error"
        assert c.get("/predict").status_code == 405
        assert c.get("/health").status_code == 200  # still serving


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                           max_leaves=12)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"task": st.one_of(st.sampled_from(["a", "b", "z", ""]), json_values),
                           "inputs": st.one_of(st.lists(st.text(max_size=200), max_size=12), json_values)}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, raw=st.one_of(st.none(), st.binary(max_size=300)))
def test_fuzzed_requests_never_get_a_5xx(served_store, body, raw):
    with client_for(served_store, max_inputs=8, max_text_chars=100, max_body_bytes=4000) as c:
        if raw is not None:
            r = c.post("/predict", content=raw, headers={"content-type": "application/json"})
        else:
            r = c.post("/predict", json=body)
        assert r.status_code < 500, (body, raw, r.text)
        assert isinstance(r.json(), dict)
        if r.status_code == 200:
            assert len(r.json()["predictions"]) == len(body["inputs"])


@pytest.mark.multiprocess
def test_a_new_store_version_is_served_without_a_failed_request(served_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(served_store, store)
    xs = make_task("a").test_inputs[:2]
    versions, failures, stop = [], [], threading.Event()
    with client_for(store, reload_interval_s=0.1) as c:
        def hammer():
            while not stop.is_set():
                r = c.post("/predict", json={"task": "a", "inputs": xs})
                if r.status_code == 200:
                    versions.append(r.json()["store_version"])
                else:
                    failures.append(r.text)

        th = threading.Thread(target=hammer)
        th.start()
        try:
            args = learn_b(store, tmp_path)
            args[args.index("--task") + 1] = "c"
            sharecl(*args)  # another process writes version 2
            deadline = time.time() + 30
            while c.get("/health").json()["store_version"] != 2 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            th.join()
        assert c.get("/health").json()["store_version"] == 2
        assert [t["name"] for t in c.get("/tasks").json()["tasks"]] == ["a", "b", "z", "c"]
        r = c.post("/predict", json={"task": "c", "inputs": xs})
        assert r.status_code == 200 and r.json()["store_version"] == 2
    assert not failures
    assert versions and set(versions) <= {1, 2} and versions == sorted(versions) and versions[-1] == 2


@pytest.mark.multiprocess
def test_sharecl_serve_is_a_real_http_server(served_store):
    import httpx

    with serving(served_store) as url:
        r = httpx.post(f"{url}/predict", json={"task": "b", "inputs": ["hello there", "apple river"]}, timeout=10)
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
        assert httpx.post(f"{url}/predict", json={"task": "nope", "inputs": ["x"]}, timeout=10).status_code == 404
        assert httpx.get(f"{url}/openapi.json", timeout=10).json()["info"]["title"] == "sharecl"


def test_serve_config_is_checked():
    with pytest.raises(ValueError, match="max_inputs"):
        ServeConfig(max_inputs=100, max_batch_size=10)
    with pytest.raises(ValueError, match="max_text_chars"):
        ServeConfig(max_text_chars=0)


@pytest.mark.parametrize("name,config", [("inflora", {"r": 4}), ("dual-lora", {"r": 4, "residual_rank": 2})])
def test_peer_stores_are_served_too(name, config, tiny_model_dir, tmp_path):
    """A peer's store answers mixed batches as its own per-task logits do (InfLoRA: one
    task-independent forward; DualLoRA: one forward per task in the batch)."""
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method
    from sharecl.train import TrainConfig

    m = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, **config)
    cfg = TrainConfig(steps=4, batch_size=8, lr=1e-2, head_lr=1e-2, max_length=16)
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        m.learn(t, cfg, progress=False)
    save_store(m, tmp_path / "s")
    xs = tasks[0].test_inputs[:3] + tasks[1].test_inputs[:3]
    names = ["a", "b", "a", "b", "a", "b"]
    mixed = m.mixed_logits(xs, names)
    for x, t, row in zip(xs, names, mixed):
        torch.testing.assert_close(row, m.logits([x], t)[0], atol=1e-5, rtol=0)
    with client_for(tmp_path / "s") as c:
        r = c.post("/predict", json={"task": "b", "inputs": xs})
        assert r.status_code == 200 and c.get("/tasks").json()["method"] == name
        torch.testing.assert_close(torch.tensor([p["probabilities"] for p in r.json()["predictions"]]),
                                   m.logits(xs, "b").softmax(-1), atol=1e-5, rtol=0)
        r = c.post("/predict", json={"inputs": xs})  # no task id: every task's classes, as cil_logits scores them
        assert r.status_code == 200, r.text
        body, want = r.json(), m.cil_logits(xs).softmax(-1)
        labels = [(t.name, c) for t in tasks for c in t.classes]
        assert body["task"] is None and body["classes"] == [f"{t}/{c}" for t, c in labels]
        torch.testing.assert_close(torch.tensor([p["probabilities"] for p in body["predictions"]]), want, atol=1e-5, rtol=0)
        assert [(p["task"], p["label"]) for p in body["predictions"]] == [labels[i] for i in want.argmax(-1).tolist()]
    # rows with and without a task id in one batch: each answered as if alone
    loaded = StoreWatcher(tmp_path / "s", interval_s=0).current
    b = MicroBatcher(lambda: loaded, max_batch_size=64, max_wait_ms=200)
    futs = [b.submit("b", xs), b.submit(None, xs), b.submit("a", xs[:2])]
    (_, p_b), (_, p_all), (_, p_a) = [f.result(timeout=60) for f in futs]
    b.close()
    assert b.batches == 1
    torch.testing.assert_close(p_b, m.logits(xs, "b").softmax(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(p_all, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(p_a, m.logits(xs[:2], "a").softmax(-1), atol=1e-5, rtol=0)


def test_top_tasks_serves_each_input_under_its_likeliest_task(served_store, tiny_model_dir, tmp_path):
    """``--top-tasks 1`` on an aligned Share store: each no-task row is answered by the task the full
    joint finds most likely; a store without aligned identification is refused."""
    from dataclasses import replace

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.train import TrainConfig

    m = ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    cfg = replace(TrainConfig(steps=4, batch_size=8, lr=1e-2, head_lr=1e-2, max_length=16), align=True, align_steps=5,
                  align_samples=4)
    tasks = [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)]
    for t in tasks:
        m.learn(t, cfg, progress=False)
    save_store(m, tmp_path / "s")
    xs = [x for t in tasks for x in t.test_inputs[:2]]
    with torch.no_grad():
        likeliest = m.cil_logits(xs).exp().reshape(len(xs), 3, 3).sum(-1).argmax(-1)  # p(t | x) from the full joint
    with client_for(tmp_path / "s", top_tasks=1) as c:
        r = c.post("/predict", json={"inputs": xs})
        assert r.status_code == 200, r.text
        preds = r.json()["predictions"]
        assert [p["task"] for p in preds] == ["abc"[int(t)] for t in likeliest]
        probs = torch.tensor([p["probabilities"] for p in preds]).reshape(len(xs), 3, 3)
        assert torch.equal(probs.sum(-1) > 0, torch.nn.functional.one_hot(likeliest, 3).bool())  # only that task ran
    with pytest.raises(ValueError, match="drop --top-tasks"):
        StoreWatcher(served_store, interval_s=0, top_tasks=1)
    with pytest.raises(ValueError, match="top_tasks"):
        ServeConfig(top_tasks=0)


def test_a_vision_store_answers_base64_images(tmp_path):
    import base64
    import io

    import numpy as np
    from PIL import Image
    from transformers import Dinov2Config, Dinov2Model

    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.train import TrainConfig
    from test_vision import _bright_dark

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=7,
                             image_size=28)).save_pretrained(tmp_path / "vit")
    m = ShareMethod(load_encoder(str(tmp_path / "vit"), image_size=28), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)
    task = _bright_dark("shade", 0)
    m.learn(task, TrainConfig(steps=10, batch_size=8, lr=1e-2, head_lr=1e-2), progress=False)
    save_store(m, tmp_path / "s")

    def b64(a):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    xs = task.test_inputs[:4]
    with client_for(tmp_path / "s") as c:
        r = c.post("/predict", json={"task": "shade", "inputs": [b64(a) for a in xs]})
        assert r.status_code == 200, r.text
        want = m.logits([np.stack([a] * 3, -1) for a in xs], "shade").softmax(-1)  # PNG grey → RGB, as the server reads it
        torch.testing.assert_close(torch.tensor([p["probabilities"] for p in r.json()["predictions"]]), want, atol=1e-5, rtol=0)
        for bad, code in ((["not base64!"], "invalid_image"), ([base64.b64encode(b"plain text").decode()], "invalid_image"),
                          (["aGVsbG8"], "invalid_image")):
            r = c.post("/predict", json={"task": "shade", "inputs": bad})
            assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text
