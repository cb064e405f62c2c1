"""Stores written by the previous release load in this one and answer as they did then, and
their next write works (issue 32: the refactor keeps the format)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_task
from sharecl.store import load_store, read_manifest, save_store

OLD = Path(__file__).with_name("data") / "stores-02a9f9a"


@pytest.mark.parametrize("name", ["share", "inflora", "sd-lora", "sd-lora-rr", "sd-lora-kd", "dual-lora"])
def test_a_store_of_the_previous_release_loads_answers_and_grows(name, tiny_model_dir, fast_cfg, tmp_path):
    store = tmp_path / name
    shutil.copytree(OLD / name, store)
    m = load_store(store, model_path=tiny_model_dir)  # the same tiny BERT, rebuilt here: its weights' sha256 must match
    assert m.name == name and m.task_names == ["a", "b"]
    tasks = [make_task("a"), make_task("b", seed=1)]
    x = tasks[0].test_inputs + tasks[1].test_inputs
    want = load_file(str(OLD / name / "expected_logits.safetensors"))
    for t in tasks:  # written on one CPU, read maybe on another: float32 tolerance
        torch.testing.assert_close(m.logits(x, t.name), want[t.name], atol=1e-5, rtol=1e-5)
    version = read_manifest(store)["version"]
    m.learn(make_task("c", seed=2), fast_cfg, progress=False)
    save_store(m, store)
    again = load_store(store, model_path=tiny_model_dir)
    assert read_manifest(store)["version"] == version + 1 and again.task_names == ["a", "b", "c"]
    for t in tasks:
        torch.testing.assert_close(again.logits(x, t.name), m.logits(x, t.name), atol=0, rtol=0)
