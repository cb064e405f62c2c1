"""`sharecl serve` on a causal LM: POST /generate, mixed-task generation, limits, 2,000 hostile requests."""

import json
import random
import threading

import pytest
import torch
from fastapi.testclient import TestClient

from conftest import tiny_generation_task
from sharecl.generation.evaluate import generate_answers
from sharecl.serve import MicroBatcher, ServeConfig, StoreWatcher, create_app
from sharecl.store import load_store, save_store

TASKS = {"alpha": "yes", "beta": "no"}


@pytest.fixture(scope="module")
def lm_store(tmp_path_factory, tiny_lm_dir):
    """A Share store on the tiny Llama: data tasks alpha ("yes") and beta ("no"), and an
    adapter-only task z from a random LoRA on half the layers."""
    from sharecl.generation.lm import load_causal_lm
    from sharecl.methods.share import ShareMethod
    from sharecl.train import TrainConfig

    d = tmp_path_factory.mktemp("serve-lm") / "store"
    # the coefficients at the encoders' ratio 1: lr 3e-2 suits the tiny Llama's LoRA, and the lm family's 10x overshoots
    m = ShareMethod(load_causal_lm(tiny_lm_dir, max_length=48), seed=0, r=4, lora_alpha=8, p=2, k=8, phi=2, coeff_lr_ratio=1.0)
    for name, answer in TASKS.items():
        m.learn(tiny_generation_task(name, answer), TrainConfig(steps=30, batch_size=8, lr=3e-2), progress=False)
    g = torch.Generator().manual_seed(0)
    m.add_adapter("z", {n: (torch.randn(l.out_features, 4, generator=g) * 0.05, torch.randn(4, l.in_features, generator=g) * 0.3)
                        for n, l in list(m.layers.items())[:2]}, scaling=2.0)
    save_store(m, d)
    return d


def prompts(name, n=4):
    return [p for p, _ in tiny_generation_task(name, TASKS.get(name, "")).test_inputs[:n]]


def client_for(store, **cfg):
    watcher = StoreWatcher(store, interval_s=cfg.pop("reload_interval_s", 0.0))
    return TestClient(create_app(watcher, ServeConfig(**cfg)))


def test_mixed_generate_equals_each_task_alone(lm_store):
    """One generate call in which rows decode under different tasks (Share's per-row gather, KV
    cache included) gives every row its own task's greedy answer, cut at its own limit."""
    m = load_store(lm_store)
    xs, tasks = prompts("alpha") + prompts("beta") + prompts("alpha", 2), ["alpha"] * 4 + ["beta"] * 4 + ["z"] * 2
    limits = [5, 1, 5, 3, 5, 5, 2, 5, 4, 4]
    mixed = m.mixed_generate(xs, tasks, limits)
    for x, t, n, got in zip(xs, tasks, limits, mixed):
        with m.task(t):
            alone = m.encoder.generate_ids([x], max_new_tokens=n)[0]
        assert got == alone, (t, x)
    assert [m.encoder.decode(r) for r in mixed[:4]] == ["yes", "y", "yes", "yes"]  # the tasks are learned
    assert sum(m.encoder.decode(r).startswith("no") for r in mixed[4:8]) >= 3
    with pytest.raises(KeyError, match="unknown task"):
        m.mixed_generate(["x"], ["nope"], [3])
    with pytest.raises(ValueError, match="max_new_tokens"):
        m.mixed_generate(["x"], ["alpha"], [0])


def test_generate_answers_like_the_method_and_chat_form(lm_store):
    m = load_store(lm_store)
    with client_for(lm_store) as c:
        tasks = {t["name"]: t for t in c.get("/tasks").json()["tasks"]}
        assert set(tasks) == {"alpha", "beta", "z"} and all(t["generate"] and not t["predict"] for t in tasks.values())
        for name in ("alpha", "beta", "z"):
            xs = prompts(name)
            r = c.post("/generate", json={"task": name, "inputs": xs, "max_new_tokens": 6})
            assert r.status_code == 200, r.text
            got = [g["text"] for g in r.json()["generations"]]
            assert got == generate_answers(m, name, xs, max_new_tokens=6)
            assert all(0 < g["tokens"] <= 6 for g in r.json()["generations"])
        chat = [[{"role": "user", "content": x}] for x in prompts("beta")]
        r = c.post("/generate", json={"task": "beta", "inputs": chat, "max_new_tokens": 6})
        assert [g["text"] for g in r.json()["generations"]] == generate_answers(m, "beta", prompts("beta"), max_new_tokens=6)
        r = c.post("/predict", json={"task": "alpha", "inputs": ["x"]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "wrong_route" and "/generate" in r.json()["error"]["message"]
        assert "/generate" in c.get("/openapi.json").json()["paths"]


def test_concurrent_requests_for_different_tasks_share_generate_calls(lm_store):
    m = load_store(lm_store)
    want = {t: generate_answers(m, t, prompts(t, 2), max_new_tokens=5) for t in ("alpha", "beta", "z")}
    results, errors = [], []
    with client_for(lm_store, max_wait_ms=80, max_batch_size=32, max_inputs=8) as c:
        def worker(i):
            t = ("alpha", "beta", "z")[i % 3]
            r = c.post("/generate", json={"task": t, "inputs": prompts(t, 2), "max_new_tokens": 5})
            (results if r.status_code == 200 else errors).append((t, r))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(18)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        health = c.get("/health").json()
    assert not errors and len(results) == 18
    for t, r in results:
        assert [g["text"] for g in r.json()["generations"]] == want[t]
    assert health["rows"] == 36 and health["batches"] < 18  # requests for different tasks shared generate calls


def test_a_generate_batch_fails_alone(lm_store):
    """A prompt that breaks the batch (here: a non-string smuggled past the API) gets the error;
    the requests batched with it are answered."""
    loaded = StoreWatcher(lm_store, interval_s=0).current
    b = MicroBatcher(lambda: loaded, max_batch_size=16, max_wait_ms=100, kind="generate")
    good = b.submit("alpha", prompts("alpha", 2), 4)
    bad = b.submit("beta", [12345], 4)
    other = b.submit("beta", prompts("beta", 1), 4)
    assert [loaded.method.encoder.decode(r) for r in good.result(timeout=60)[1]] == ["yes", "yes"]
    assert other.result(timeout=60)[1][0]
    with pytest.raises(TypeError):
        bad.result(timeout=60)
    b.close()
    assert b.isolated == 1


@pytest.mark.parametrize("body,status,code", [
    ({"task": "nope", "inputs": ["x"]}, 404, "unknown_task"),
    ({"task": "alpha", "inputs": ["x"], "max_new_tokens": 0}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": ["x"], "max_new_tokens": -3}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": ["x"], "max_new_tokens": 10 ** 12}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": ["x"], "max_new_tokens": "many"}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": ["x" * 60]}, 413, "prompt_too_long"),
    ({"task": "alpha", "inputs": ["x"] * 9}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": [[{"role": "assistant", "content": "hi"}]]}, 422, "invalid_prompt"),
    ({"task": "alpha", "inputs": [[{"role": "robot", "content": "hi"}]]}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": [[]]}, 422, "invalid_request"),
    ({"task": "alpha", "inputs": ["x"], "temperature": 1}, 422, "invalid_request"),
])
def test_bad_generate_requests_get_a_4xx_json_error(lm_store, body, status, code):
    with client_for(lm_store, max_inputs=8, max_new_tokens=16, max_prompt_tokens=40) as c:
        r = c.post("/generate", json=body)
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text
        assert r.json()["error"]["message"]


def _hostile_body(rng: random.Random):
    """One hostile /generate request body (bytes): bad JSON, wrong types, invalid UTF-8, control
    characters, huge or empty prompts, unknown tasks, absurd max_new_tokens, odd chat turns."""
    junk = ["", "\x00", "\u202e\u0007", "\ud7ff" * 3, "x" * rng.randint(1, 3000), "".join(chr(rng.randint(0, 0x2FF)) for _ in range(40))]
    task = rng.choice(["alpha", "beta", "z", "nope", "", "a" * 300, 7, None, ["alpha"], {"t": 1}])
    prompt = rng.choice(junk + [rng.choice(prompts("alpha"))])
    inputs = rng.choice([[prompt], [prompt] * rng.randint(0, 20), prompt, [[{"role": "user", "content": prompt}]],
                         [[{"role": rng.choice(["user", "system", "assistant", "x", 3]), "content": prompt}] * rng.randint(0, 70)],
                         [None], [1.5], [{"role": "user"}], []])
    body = {"task": task, "inputs": inputs, "max_new_tokens": rng.choice([1, 4, 0, -1, 2 ** 63, 1e300, "4", None, True, [4]])}
    for key in list(body):
        if rng.random() < 0.1:
            del body[key]
    if rng.random() < 0.1:
        body["extra"] = "field"
    kind = rng.random()
    if kind < 0.1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 400)))  # not JSON, often not UTF-8
    raw = json.dumps(body).encode()
    if kind < 0.2:
        return raw[: rng.randint(0, len(raw))]  # truncated JSON
    if kind < 0.3:
        cut = rng.randint(0, len(raw))
        return raw[:cut] + b"\xff\xfe\xc0" + raw[cut:]  # invalid UTF-8 inside
    return raw


def test_two_thousand_hostile_requests_never_get_a_5xx(lm_store):
    rng = random.Random(0)
    statuses = {}
    with client_for(lm_store, max_inputs=16, max_text_chars=2000, max_body_bytes=20_000, max_new_tokens=4,
                    max_prompt_tokens=40, max_wait_ms=0) as c:
        for _ in range(2000):
            raw = _hostile_body(rng)
            r = c.post("/generate", content=raw, headers={"content-type": "application/json"})
            assert r.status_code < 500, (raw[:200], r.text)
            body = r.json()
            assert isinstance(body, dict) and (r.status_code == 200 or body["error"]["message"])
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        assert c.get("/health").json()["status"] == "ok"
    assert statuses.get(200, 0) >= 20 and statuses.get(422, 0) >= 500 and statuses.get(404, 0) >= 10, statuses


@pytest.mark.multiprocess
def test_a_task_folded_while_serving_is_answered_without_a_failed_request(lm_store, tmp_path):
    """`sharecl add-adapter` in another process writes version 2 (a PEFT export of alpha folded
    as alpha2); the server switches to it between batches while requests keep coming."""
    import shutil
    import time

    from conftest import sharecl

    store = tmp_path / "store"
    shutil.copytree(lm_store, store)
    xs = prompts("alpha", 2)
    versions, failures, stop = [], [], threading.Event()
    with client_for(store, reload_interval_s=0.1) as c:
        def hammer():
            while not stop.is_set():
                r = c.post("/generate", json={"task": "alpha", "inputs": xs, "max_new_tokens": 4})
                (versions.append(r.json()["store_version"]) if r.status_code == 200 else failures.append(r.text))

        th = threading.Thread(target=hammer)
        th.start()
        try:
            sharecl("export", store, tmp_path / "alpha-lora", "--task", "alpha")
            sharecl("add-adapter", store, tmp_path / "alpha-lora", "--task", "alpha2", "--any-rank")
            deadline = time.time() + 30
            while c.get("/health").json()["store_version"] != 2 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            th.join()
        health = c.get("/health").json()
        assert health["store_version"] == 2, health
        r = c.post("/generate", json={"task": "alpha2", "inputs": xs, "max_new_tokens": 4})
        assert r.status_code == 200 and r.json()["store_version"] == 2
        assert [g["text"] for g in r.json()["generations"]] == ["yes", "yes"]  # the folded copy answers like alpha
    assert not failures
    assert versions and versions == sorted(versions) and versions[-1] == 2
