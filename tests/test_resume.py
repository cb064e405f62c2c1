"""A stopped run resumes after its last finished task (sharecl.resume): the resumed run's results
equal an uninterrupted run's, for methods saved as stores and the LoRA baselines' state files, on
classification and generation streams, and the global torch RNG
continues where it stood; a checkpoint made with other settings is refused, not silently mixed in."""

import json

import pytest
import torch

from conftest import make_task, tiny_generation_task
from sharecl.data.tasks import Stream
from sharecl.methods import METHODS
from sharecl.runner import run_stream
from sharecl.train import TrainConfig


class Stop(Exception):
    """Stands for a killed process."""


def _stop_before(monkeypatch, names, task_name, draws=None, stop=True):
    """Make every method in ``names`` raise :class:`Stop` when it starts learning ``task_name``
    (``stop=False``: learn it). Every task starts with a draw of the global torch RNG (as a
    method whose training drew from it would); the one at ``task_name`` goes to ``draws``."""
    for m in names:
        cls = METHODS[m]
        learn = cls.learn

        def stopping(self, task, *a, _learn=learn, **k):
            drawn = torch.rand(4)
            if task.name == task_name:
                if draws is not None:
                    draws.append(drawn)
                if stop:
                    raise Stop
            return _learn(self, task, *a, **k)

        monkeypatch.setattr(cls, "learn", stopping)


def _close(a, b, where: str) -> None:
    """Equal structures; floats to 1e-6 relative (a restored Share folds its coefficient logs, so a
    merge's drift is computed from the same matrices rounded differently)."""
    if isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _same(a: dict, b: dict, keys=("accuracy_matrix", "til_accuracy_matrix", "adapter_bytes_after_task", "bytes_per_task",
                                  "sample_answers")):
    """Scores, answers and bytes equal to the bit; what report() says equal to rounding."""
    for k in keys:
        if k in ("merges", "thresholds", "magnitudes", "kd_fits"):
            _close(a.get(k), b.get(k), k)
        else:
            assert a.get(k) == b.get(k), k


def test_a_stopped_classification_run_resumes_where_it_stopped(tiny_model_dir, fast_cfg, tmp_path, monkeypatch):
    stream = Stream("tiny4", [make_task(n, seed=i) for i, n in enumerate("abcd")], seed=0, scenario="cil")
    names = ["share", "inflora", "sd-lora", "dual-lora", "seq-lora"]
    quiet = dict(model_path=tiny_model_dir, method_configs={"share": {"r": 4, "k": 4, "p": 2}}, progress=False,
                 log=lambda *a: None)
    whole = run_stream(stream, names, fast_cfg, tmp_path / "whole", **quiet)
    assert not any((tmp_path / "whole" / m / "checkpoint").exists() for m in names)  # removed at the end

    for m in names:  # every method stopped before its third task
        with monkeypatch.context() as mp:
            _stop_before(mp, [m], "c")
            with pytest.raises(Stop):
                run_stream(stream, [m], fast_cfg, tmp_path / "cut", **quiet)
        assert json.loads((tmp_path / "cut" / m / "checkpoint" / "manifest.json").read_text())["run"]["done"] == 2
    logs: list[str] = []
    resumed = run_stream(stream, names, fast_cfg, tmp_path / "cut", resume=True, **{**quiet, "log": logs.append})
    for m in names:
        assert any(f"{m} · resuming after task 2 of 4 (b)" in line for line in logs), m
        assert not any(line.startswith(f"{m} · after a") or line.startswith(f"{m} · after b") for line in logs)
        _same(resumed[m], whole[m])
        assert len(resumed[m]["train_seconds"]) == 4
        assert not (tmp_path / "cut" / m / "checkpoint").exists()
    for m, keys in (("share", ["merges"]), ("inflora", ["memory_dims", "thresholds"]), ("dual-lora", ["memory_dims"]),
                    ("sd-lora", ["magnitudes", "kd_fits"])):
        _same(resumed[m], whole[m], keys)  # what report() says of the whole stream


def test_a_stopped_generation_run_resumes_with_its_answers(tiny_lm_dir, tmp_path, monkeypatch):
    cfg = TrainConfig(steps=6, batch_size=8, lr=3e-3, eval_batch_size=8, max_length=64)
    stream = Stream("gen3", [tiny_generation_task(n, a) for n, a in (("ask", "yes"), ("tell", "no"), ("say", "ok"))],
                    seed=0, modality="lm")
    quiet = dict(model_path=tiny_lm_dir, method_configs={"share": {"r": 4, "k": 4, "p": 2}}, progress=False,
                 log=lambda *a: None)
    draws: list[torch.Tensor] = []
    with monkeypatch.context() as mp:
        _stop_before(mp, ["share"], "say", draws, stop=False)
        names = ["share", "lora-per-task", "seq-lora"]  # a store; the LoRA baselines' state file
    with monkeypatch.context() as mp:
        _stop_before(mp, ["share"], "say", draws, stop=False)
        whole = run_stream(stream, names, cfg, tmp_path / "whole", **quiet)
    for m in names:
        with monkeypatch.context() as mp:
            _stop_before(mp, [m], "say")
            with pytest.raises(Stop):
                run_stream(stream, [m], cfg, tmp_path / "cut", **quiet)
    torch.manual_seed(12345)  # whatever the process did in between
    with monkeypatch.context() as mp:
        _stop_before(mp, ["share"], "say", draws, stop=False)
        logs: list[str] = []
        resumed = run_stream(stream, names, cfg, tmp_path / "cut", resume=True, **{**quiet, "log": logs.append})
    for m in names:
        assert any(f"{m} · resuming after task 2 of 3 (tell)" in line for line in logs), m
        _same(resumed[m], whole[m])
        assert resumed[m]["sample_answers"]  # the first answers of every task, kept across the stop
    assert torch.equal(draws[0], draws[1])  # the RNG continues as in the uninterrupted run


def test_a_checkpoint_made_with_other_settings_is_refused_and_no_resume_discards_it(tiny_model_dir, fast_cfg, tmp_path,
                                                                                     monkeypatch):
    stream = Stream("tiny3", [make_task(n, seed=i) for i, n in enumerate("abc")], seed=0)
    quiet = dict(model_path=tiny_model_dir, progress=False, log=lambda *a: None)
    share = {"share": {"r": 4, "k": 4, "p": 2}}
    with monkeypatch.context() as mp:
        _stop_before(mp, ["share"], "c")
        with pytest.raises(Stop):
            run_stream(stream, ["share"], fast_cfg, tmp_path, method_configs=share, **quiet)
    with pytest.raises(ValueError, match=r"other settings: lr=0\.01 \(now 0\.03\).*--no-resume"):
        run_stream(stream, ["share"], TrainConfig(**{**vars(fast_cfg), "lr": 3e-2}), tmp_path, method_configs=share,
                   resume=True, **quiet)
    with pytest.raises(ValueError, match=r"share\.p"):
        run_stream(stream, ["share"], fast_cfg, tmp_path, method_configs={"share": {"r": 4, "k": 4, "p": 1}}, resume=True,
                   **quiet)
    logs: list[str] = []
    run_stream(stream, ["share"], fast_cfg, tmp_path, method_configs=share, **{**quiet, "log": logs.append})
    assert sum(line.startswith("share · after") for line in logs) == 3  # resume=False: from the first task
