"""Every storable method survives learn → save → load → learn → save → load → learn → load,
with every task's predictions compared after each reload (issue 12: a DualLoRA store was
destroyed by its second `learn`)."""

import shutil

import pytest
import torch

from conftest import make_task, sharecl_in_process, write_csv
from sharecl.store import STORABLE, load_store, read_manifest, save_store

CONFIGS = {
    "share": {"r": 4, "lora_alpha": 8, "p": 2, "k": 4, "phi": 2},
    "inflora": {"r": 4},
    "sd-lora": {"r": 4, "lora_alpha": 8},
    "sd-lora-rr": {"r": 4, "lora_alpha": 8},
    "sd-lora-kd": {"r": 4, "lora_alpha": 8},
    "dual-lora": {"r": 4, "residual_rank": 2},
}
TASKS = [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)]
XS = [x for t in TASKS for x in t.test_inputs]


def _predictions(method) -> dict:
    """Every task's task-id logits on the inputs of all tasks, and the class-incremental logits."""
    with torch.no_grad():
        out = {t: method.logits(XS, t) for t in method.task_names}
        out["<cil>"] = method.cil_logits(XS)
    return out


def _assert_same(got: dict, want: dict, when: str) -> None:
    assert list(got) == list(want), when
    for k in want:
        assert torch.equal(got[k], want[k]), f"{when}: task {k!r} predicts differently after reload"


def test_every_storable_method_has_a_roundtrip_case():
    assert set(CONFIGS) == set(STORABLE)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_learn_save_load_three_times(name, tiny_model_dir, fast_cfg, tmp_path):
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method

    store = tmp_path / "s"
    method = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, **CONFIGS[name])
    method.begin_stream(None)  # open-ended, as a store is
    for i, task in enumerate(TASKS):
        method.learn(task, fast_cfg, progress=False)
        before = _predictions(method)
        assert save_store(method, store)["version"] == i + 1
        method = load_store(store)  # the next task is learned by the reloaded method
        assert method.task_names == [t.name for t in TASKS[: i + 1]]
        _assert_same(_predictions(method), before, f"{name}, after saving version {i + 1}")
        assert _predictions(method)["<cil>"].shape == (len(XS), 3 * (i + 1))
    assert read_manifest(store)["version"] == 3


@pytest.mark.parametrize("name", ["dual-lora", "sd-lora-kd"])
def test_the_command_line_round_trip(name, tiny_model_dir, tmp_path):
    """`sharecl learn` three times on one store (typer's CliRunner, in process), and after each,
    `sharecl predict` answers for every task exactly as the store loaded in Python does."""
    store = tmp_path / "s"
    for i, task in enumerate(TASKS):
        data = write_csv(tmp_path / f"{task.name}.csv", task)
        extra = ["--model", tiny_model_dir, "--method", name, "-r", 4] if i == 0 else []
        out = sharecl_in_process("learn", store, "--task", task.name, "--data", data, "--steps", 3, "--no-progress", *extra)
        assert f"store version {i + 1}" in out.stdout
        loaded = load_store(store)
        assert loaded.task_names == [t.name for t in TASKS[: i + 1]]
        for t in TASKS[: i + 1]:
            p = sharecl_in_process("predict", store, "--task", t.name, "--json", *t.test_inputs[:2])
            import json

            labels = [json.loads(line)["label"] for line in p.stdout.strip().splitlines()]
            with torch.no_grad():
                want = loaded.logits(t.test_inputs[:2], t.name).argmax(-1).tolist()
            assert labels == [loaded.task_classes[t.name][j] for j in want]


@pytest.mark.parametrize("name", ["dual-lora", "sd-lora", "inflora"])
def test_hot_reload_serves_every_version_of_a_peer_store(name, tiny_model_dir, fast_cfg, tmp_path):
    """A running server picks up versions 2 and 3 written by another writer; each version's
    answers equal the method's own, for every task."""
    from fastapi.testclient import TestClient

    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method
    from sharecl.serve import ServeConfig, StoreWatcher, create_app

    store = tmp_path / "s"
    method = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, **CONFIGS[name])
    method.begin_stream(None)
    method.learn(TASKS[0], fast_cfg, progress=False)
    save_store(method, store)
    watcher = StoreWatcher(store, interval_s=0)
    with TestClient(create_app(watcher, ServeConfig())) as c:
        for i in range(1, 3):
            writer = load_store(store)
            writer.learn(TASKS[i], fast_cfg, progress=False)
            save_store(writer, store)
            assert watcher.check() and c.get("/health").json()["store_version"] == i + 1
            for t in TASKS[: i + 1]:
                r = c.post("/predict", json={"task": t.name, "inputs": t.test_inputs})
                assert r.status_code == 200, r.text
                got = torch.tensor([p["probabilities"] for p in r.json()["predictions"]])
                torch.testing.assert_close(got, writer.logits(t.test_inputs, t.name).softmax(-1), atol=1e-5, rtol=0)
    shutil.rmtree(store)
