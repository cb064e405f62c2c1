"""Every registered method through the runner on a 2-task stream: results schema, plot, store."""

import json

import pytest

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
    configs = {"share": {"r": 4, "k": 4, "p": 2}}
    results = run_stream(stream, sorted(METHODS), fast_cfg, tmp_path, model_path=tiny_model_dir,
                         method_configs=configs, progress=False, log=lambda *a: None)
    assert set(results) == {"share", "lora-per-task", "seq-lora", "head-only"}
    for name, res in results.items():
        on_disk = json.loads((tmp_path / name / "results.json").read_text())
        assert KEYS <= set(on_disk), KEYS - set(on_disk)
        R = on_disk["accuracy_matrix"]
        assert R[0][1] is None and all(0 <= v <= 1 for row in R for v in row if v is not None)
        assert (tmp_path / name / "accuracy_matrix.png").stat().st_size > 1000
        assert on_disk["head_bytes_per_task"] == (32 * 3 + 3) * 4
    assert results["share"]["bytes_per_task"] == 4 * (4 + 4) * 2 * 4  # 4 layers, k_B + k_A = 8, p = 2, float32
    assert results["lora-per-task"]["bytes_per_task"] == 4 * 8 * (32 + 32) * 4
    assert results["seq-lora"]["bytes_per_task"] == 0 and results["seq-lora"]["bytes_shared"] == 4 * 8 * 64 * 4
    assert results["head-only"]["forgetting"] == pytest.approx(0.0)
    assert results["lora-per-task"]["forgetting"] == pytest.approx(0.0)  # one adapter per task: nothing moves
    assert load_store(tmp_path / "share" / "store").task_names == ["a", "b"]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["a", "b"] and manifest["tasks"][0]["seed"] == 0
