"""Generation streams declared in a file (the user's own tasks through `compare`): splits,
metrics, given test/validation files, clear errors, and a tuned comparison on the tiny Llama."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import sharecl_in_process, write_jsonl
from sharecl.data.streams import get_stream
from sharecl.data.tasks import validation_stream


def _pairs(tag: str, n: int, answer: str | None = None) -> list[tuple[str, str]]:
    return [(f"{tag} {i:03d}?", answer or f"{tag}{i % 3}") for i in range(n)]


def _write_stream(tmp_path, extra: dict | None = None, **task_b) -> str:
    write_jsonl(tmp_path / "a.jsonl", _pairs("ask", 40, "yes"))
    write_jsonl(tmp_path / "b.jsonl", _pairs("tell", 30))
    spec = {"name": "mine", "seed": 0, "max_length": 64, "tasks": [
        {"name": "ask", "data": "a.jsonl", "metric": "exact-match", "max_new_tokens": 4, "test_size": 6, "val_size": 5},
        {"name": "tell", "data": "b.jsonl", **task_b}]}
    spec.update(extra or {})
    (tmp_path / "mine.yaml").write_text(json.dumps(spec))  # JSON is YAML
    return str(tmp_path / "mine.yaml")


def test_stream_file_splits_are_seeded_disjoint_and_recorded(tmp_path):
    path = _write_stream(tmp_path)
    s = get_stream(path, seed=0)
    assert s.name == "mine" and s.modality == "lm" and s.scenario == "til" and s.max_length == 64
    ask, tell = s.tasks
    assert (ask.metric, ask.max_new_tokens, tell.metric, tell.max_new_tokens) == ("exact-match", 4, "rouge-l", 32)
    assert (len(ask.test_inputs), len(ask.val_inputs), len(ask.train_inputs)) == (6, 5, 29)
    assert (len(tell.test_inputs), len(tell.val_inputs), len(tell.train_inputs)) == (6, 6, 18)  # 20 % held out, val as test
    for t in s:
        splits = [{p for p, _ in x} for x in (t.train_inputs, t.test_inputs, t.val_inputs)]
        assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
        assert t.describe()["val_size"] == len(t.val_inputs) and t.describe()["source"].endswith(".jsonl")
    assert get_stream(path, seed=0).tasks[1].test_inputs == tell.test_inputs  # the seed decides the split
    assert get_stream(path, seed=1).tasks[1].test_inputs != tell.test_inputs
    val = validation_stream(s)
    assert val.tasks[0].test_inputs == ask.val_inputs and val.tasks[0].meta["evaluated_on"] == "validation"


def test_stream_file_uses_given_test_and_validation_files(tmp_path):
    write_jsonl(tmp_path / "b-test.jsonl", _pairs("tell", 4))  # these prompts are also in b.jsonl: dropped from training
    write_jsonl(tmp_path / "b-val.jsonl", [("held out?", "tell0")])
    s = get_stream(_write_stream(tmp_path, test="b-test.jsonl", validation="b-val.jsonl"), seed=3)
    tell = s.tasks[1]
    assert tell.test_inputs == _pairs("tell", 4) and tell.val_inputs == [("held out?", "tell0")]
    assert len(tell.train_inputs) == 26 and not {p for p, _ in tell.train_inputs} & {p for p, _ in tell.test_inputs}
    assert tell.meta["dropped_shared_prompts"] == 4 and tell.meta["test_file"].endswith("b-test.jsonl")


def test_stream_file_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        get_stream(_write_stream(tmp_path, colour="red"))
    with pytest.raises(ValueError, match="leave none for training"):
        get_stream(_write_stream(tmp_path, test_size=20, val_size=10))
    with pytest.raises(ValueError, match="metric must be one of"):
        get_stream(_write_stream(tmp_path, metric="bleu"))
    with pytest.raises(ValueError, match="takes no option train_per_class"):
        get_stream(_write_stream(tmp_path), train_per_class=3)
    (tmp_path / "bad.yaml").write_text("tasks: [{name: a}]\nkind: generation\n")
    with pytest.raises(ValueError, match="needs at least `name` and `data`"):
        get_stream(str(tmp_path / "bad.yaml"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_stream(str(tmp_path / "missing.yaml"))


def test_compare_tunes_and_runs_every_method_on_a_stream_file(tmp_path, tiny_lm_dir):
    from sharecl.compare import compare
    from sharecl.train import TrainConfig

    path = _write_stream(tmp_path, metric="exact-match", max_new_tokens=4)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, eval_batch_size=8)
    summary, md = compare(path, ["share", "lora-per-task"], [0], cfg, tmp_path / "out", model_path=tiny_lm_dir,
                          method_configs={"share": {"r": 4, "k": 8, "p": 2}}, progress=False, log=lambda *_: None,
                          tune_lrs=[3e-2, 1e-5])
    tuned = json.loads((tmp_path / "out" / "compare.json").read_text())["tuned_lr"]
    assert set(tuned) == {"share", "lora-per-task"} and all(set(t["validation_final_accuracy"]) == {"0.03", "1e-05"}
                                                            for t in tuned.values())
    trial = json.loads((tmp_path / "out" / "tune" / "lr-0.03" / "manifest.json").read_text())["tasks"]
    assert [t["evaluated_on"] for t in trial] == ["validation"] * 2 and trial[0]["test_size"] == 5  # ask's validation split
    run = json.loads((tmp_path / "out" / "seed-0" / "share" / "results.json").read_text())
    assert run["metrics"] == {"ask": "exact-match", "tell": "exact-match"} and run["stream"] == "mine"
    assert run["train_config"]["lr"] == tuned["share"]["lr"] and "| share |" in md


def test_compare_target_modules_and_method_rates(tmp_path, tiny_lm_dir):
    """`--target-modules all-linear` adapts every linear layer but the output head, for each method alike;
    `--method-lr` sets one method's rate and the report says so."""
    from transformers import AutoModelForCausalLM

    path = _write_stream(tmp_path, metric="exact-match", max_new_tokens=4)
    sharecl_in_process("compare", "--stream", path, "--methods", "lora-per-task,share", "--seeds", "0", "--steps", "2",
                       "--batch-size", "4", "-r", "4", "--k", "8", "--p", "2", "--model", tiny_lm_dir,
                       "--target-modules", "all-linear", "--method-lr", "share=0.02", "--no-progress", "--out", tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    runs = {m: json.loads((tmp_path / "out" / "seed-0" / m / "results.json").read_text()) for m in ("lora-per-task", "share")}
    assert all(r["config"]["target_modules"] == "all-linear" for r in runs.values())
    assert runs["lora-per-task"]["params_per_task"] == 4 * sum(m.in_features + m.out_features for m in linear)
    assert runs["share"]["train_config"]["lr"] == 0.02 and runs["lora-per-task"]["train_config"]["lr"] == 1e-3  # --lr's default
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["method_lr"] == {"share": 0.02}
    assert "share **0.02**" in (tmp_path / "out" / "compare.md").read_text()
    for bad, expect in ((["--target-modules", " , "], "--target-modules"), (["--method-lr", "share:0.1"], "METHOD=RATE"),
                        (["--method-lr", "inflora=0.1"], "not among the methods run"),
                        (["--method-lr", "share=0.1", "--tune-lr", "0.1"], "give one of them")):
        r = sharecl_in_process("compare", "--stream", path, "--methods", "share", *bad, "--out", tmp_path / "x", check=False)
        assert r.returncode == 1 and expect in r.stderr, (bad, r.stderr)
