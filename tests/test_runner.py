"""Every registered method through the runner on a 2-task stream: results schema, plot, store."""

import json

import pytest
import torch

from conftest import make_task
from sharecl.data.tasks import Stream
from sharecl.methods import METHODS
from sharecl.runner import run_stream
from sharecl.store import load_store

KEYS = {"method", "stream", "tasks", "accuracy_matrix", "final_average_accuracy", "average_incremental_accuracy",
        "forgetting", "bwt", "params_per_task", "bytes_per_task", "head_bytes_per_task", "bytes_shared",
        "train_seconds", "peak_rss_bytes"}


def test_all_methods_two_tasks(tiny_model_dir, fast_cfg, tmp_path):
    stream = Stream("tiny2", [make_task("a"), make_task("b", seed=1)], seed=0)
    configs = {"share": {"r": 4, "k": 4, "p": 2}, "share-full": {"r": 4, "k": 4, "p": 2, "old_task_steps": 3}}
    names = sorted(m for m in METHODS if "classification" in METHODS[m].task_kinds)
    results = run_stream(stream, names, fast_cfg, tmp_path, model_path=tiny_model_dir,
                         method_configs=configs, progress=False, log=lambda *a: None)
    assert set(results) == {"share", "share-full", "lora-per-task", "seq-lora", "head-only", "joint-lora", "inflora",
                            "sd-lora", "sd-lora-rr", "sd-lora-kd", "dual-lora"}
    for name in results:
        on_disk = json.loads((tmp_path / name / "results.json").read_text())
        assert KEYS <= set(on_disk), KEYS - set(on_disk)
        R = on_disk["accuracy_matrix"]
        assert R[0][1] is None and R[1][1] is not None
        if METHODS[name].storable:  # the last row, recomputed from the saved store's own predictions
            loaded = load_store(tmp_path / name / "store")
            for j, t in enumerate(stream):
                pred = loaded.logits(t.test_inputs, t.name).argmax(-1)
                assert R[1][j] == pytest.approx((pred == torch.tensor(t.test_labels)).float().mean().item()), (name, t.name)
        assert len(on_disk["adapter_bytes_after_task"]) == (1 if name == "joint-lora" else 2)
        assert (tmp_path / name / "accuracy_matrix.png").stat().st_size > 1000
        protos = 3 * 32 * 4 if name.startswith("share") else 0  # Share also keeps class prototypes (3 classes × hidden 32)
        assert on_disk["head_bytes_per_task"] == (32 * 3 + 3) * 4 + protos
    assert results["share"]["bytes_per_task"] == 4 * (4 + 4) * 2 * 4  # 4 layers, k_B + k_A = 8, p = 2, float32
    assert results["share-full"]["bytes_per_task"] == results["share"]["bytes_per_task"]
    assert not (tmp_path / "share-full" / "store").exists()  # it keeps its tasks' data: no store
    assert results["lora-per-task"]["bytes_per_task"] == 4 * 8 * (32 + 32) * 4
    assert results["seq-lora"]["bytes_per_task"] == 0 and results["seq-lora"]["bytes_shared"] == 4 * 8 * 64 * 4
    assert results["head-only"]["forgetting"] == pytest.approx(0.0)
    assert results["lora-per-task"]["forgetting"] == pytest.approx(0.0)  # one adapter per task: nothing moves
    assert load_store(tmp_path / "share" / "store").task_names == ["a", "b"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["a", "b"] and manifest["tasks"][0]["seed"] == 0


def test_joint_lora_has_only_a_final_row(tiny_model_dir, fast_cfg, tmp_path):
    stream = Stream("tiny2", [make_task("a"), make_task("b", seed=1)], seed=0)
    res = run_stream(stream, ["joint-lora"], fast_cfg, tmp_path, model_path=tiny_model_dir, progress=False,
                     log=lambda *a: None)["joint-lora"]
    assert res["accuracy_matrix"][0] == [None, None] and None not in res["accuracy_matrix"][1]
    assert res["final_average_accuracy"] is not None and res["forgetting"] is None
    assert res["bytes_shared"] == 4 * 8 * 64 * 4 and res["bytes_per_task"] == 0


def test_class_incremental_stream_reports_both_matrices(tiny_model_dir, fast_cfg, tmp_path):
    stream = Stream("tiny2", [make_task("a"), make_task("b", seed=1)], seed=0, scenario="cil")
    names = ["share", "inflora", "sd-lora", "dual-lora", "seq-lora", "head-only"]
    results = run_stream(stream, names, fast_cfg, tmp_path, model_path=tiny_model_dir,
                         method_configs={"share": {"r": 4, "k": 4, "p": 2}}, progress=False, log=lambda *a: None)
    for res in results.values():
        assert res["scenario"] == "cil"
        assert len(res["til_accuracy_matrix"]) == 2 and res["til_final_average_accuracy"] is not None
    # with one task seen, class-incremental and task-incremental accuracy coincide (same classes)
    for name in ("inflora", "sd-lora", "seq-lora", "head-only", "share"):
        assert results[name]["accuracy_matrix"][0][0] == pytest.approx(results[name]["til_accuracy_matrix"][0][0])


def test_task_incremental_only_method_refuses_cil(tiny_model_dir, fast_cfg, tmp_path):
    from sharecl.methods import UnsupportedScenarioError

    stream = Stream("tiny2", [make_task("a"), make_task("b", seed=1)], seed=0, scenario="cil")
    with pytest.raises(UnsupportedScenarioError, match="lora-per-task"):
        run_stream(stream, ["lora-per-task"], fast_cfg, tmp_path, model_path=tiny_model_dir, progress=False, log=lambda *a: None)


def test_evaluating_after_the_last_task_only_gives_the_same_final_row(tiny_model_dir, fast_cfg, tmp_path):
    """Evaluation is read-only: skipping the intermediate evaluations (``compare``'s tuning) must not
    change what the methods learn, so the final rows are equal to the bit, TIL and CIL."""
    stream = Stream("tiny3", [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)], seed=0, scenario="cil")
    names = ["share", "inflora", "sd-lora", "dual-lora"]
    configs = {"share": {"r": 4, "k": 4, "p": 2}}
    quiet = dict(model_path=tiny_model_dir, method_configs=configs, progress=False, log=lambda *a: None)
    each = run_stream(stream, names, fast_cfg, tmp_path / "each", **quiet)
    last = run_stream(stream, names, fast_cfg, tmp_path / "last", evaluate="last", **quiet)
    for m in names:
        assert last[m]["accuracy_matrix"][:2] == [[None] * 3, [None] * 3] and last[m]["evaluated"] == "last"
        assert last[m]["accuracy_matrix"][2] == each[m]["accuracy_matrix"][2], m
        assert last[m]["til_accuracy_matrix"][2] == each[m]["til_accuracy_matrix"][2], m
        assert last[m]["final_average_accuracy"] == each[m]["final_average_accuracy"]
        assert last[m]["average_incremental_accuracy"] is None and each[m]["average_incremental_accuracy"] is not None
        assert len(last[m]["train_seconds"]) == 3
    with pytest.raises(ValueError, match="evaluate must be one of"):
        run_stream(stream, ["head-only"], fast_cfg, tmp_path / "bad", evaluate="never", **quiet)


def test_isolated_tasks_are_scored_once_and_give_the_full_matrix(tiny_model_dir, fast_cfg, tmp_path, monkeypatch):
    """LoRA per task and head-only score each task once, when learned; the matrix equals the one
    re-evaluated after every task (which it would not if learning touched an old task's adapter or head)."""
    import sharecl.runner as runner

    stream = Stream("tiny3", [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)], seed=0)
    names = ["lora-per-task", "head-only"]
    quiet = dict(model_path=tiny_model_dir, progress=False, log=lambda *a: None)
    calls: list[str] = []
    score = runner._score
    monkeypatch.setattr(runner, "_score", lambda m, t, *a, **k: calls.append(t.name) or score(m, t, *a, **k))
    once = run_stream(stream, names, fast_cfg, tmp_path / "once", **quiet)
    assert calls == ["a", "b", "c"] * 2  # per method: the new task only
    for m in names:
        monkeypatch.setattr(METHODS[m], "isolated_tasks", False)
    calls.clear()
    every = run_stream(stream, names, fast_cfg, tmp_path / "every", **quiet)
    assert len(calls) == 2 * 6
    for m in names:
        assert once[m]["accuracy_matrix"] == every[m]["accuracy_matrix"], m


def test_one_forward_scores_both_til_and_cil_where_the_backbone_ignores_the_task(tiny_model_dir, fast_cfg, tmp_path,
                                                                                   monkeypatch):
    """InfLoRA, SD-LoRA, SeqLoRA and head-only compute the same features for every task: the runner takes
    both the task-incremental and the class-incremental score from one backbone forward, and both
    equal what the two separate evaluations give."""
    from sharecl import runner

    stream = Stream("tiny3", [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)], seed=0, scenario="cil")
    for name in ("inflora", "sd-lora", "seq-lora", "head-only"):
        res = run_stream(stream, [name], fast_cfg, tmp_path / name, model_path=tiny_model_dir, progress=False,
                         log=lambda *a: None)[name]
        torch.manual_seed(fast_cfg.seed)  # as run_method does: dropout draws from the global generator
        method = runner.build_method(name, runner.load_backbone(stream, tiny_model_dir, fast_cfg), seed=0)
        method.check_scenario("cil")
        method.begin_stream(len(stream))
        for t in stream.tasks:
            method.learn(t, fast_cfg, progress=False)
        calls = []
        encode = method.encoder.encode
        monkeypatch.setattr(method.encoder, "encode", lambda batch, c=calls, f=encode: c.append(1) or f(batch))
        fast = runner._rows(method, stream, 2, fast_cfg)
        n_fast = len(calls)
        monkeypatch.setattr(METHODS[name], "task_independent_backbone", False)
        slow = runner._rows(method, stream, 2, fast_cfg)
        monkeypatch.undo()
        assert fast == slow, name
        assert fast == (res["til_accuracy_matrix"][2], res["accuracy_matrix"][2]), name  # what run_stream recorded
        assert 2 * n_fast == len(calls) - n_fast, name  # half the forwards
