"""The training loop's options: modality-default learning rates, warm-up, clipping."""

import pytest
import torch

from conftest import make_task
from sharecl.train import DEFAULT_LR, TrainConfig, train_steps


def _one_param_run(cfg: TrainConfig, steps: int) -> list[float]:
    """A single scalar parameter moved by AdamW on a fixed task; returns its value after each step."""
    p = torch.nn.Parameter(torch.zeros(3))
    values = []

    def forward(xs, ys, reduction="mean"):  # a task objective's (loss, count)
        values.append(float(p[0]))
        return torch.nn.functional.cross_entropy(p.expand(len(xs), 3), ys, reduction=reduction), torch.tensor(float(len(xs)))

    train_steps(forward, [{"params": [p], "lr": cfg.lr}], make_task("t"), cfg, steps=steps, progress=False)
    values.append(float(p[0]))
    return values[1:]


def test_warmup_scales_the_first_steps_linearly():
    plain = _one_param_run(TrainConfig(steps=1, lr=0.1), 1)
    warm = _one_param_run(TrainConfig(steps=1, lr=0.1, warmup_steps=9), 1)
    assert abs(plain[0]) > 0 and warm[0] == pytest.approx(plain[0] / 10, rel=1e-4)  # Adam's first step is lr-sized


def test_clipping_bounds_the_gradient_norm(monkeypatch):
    seen = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        total = real(params, max_norm)
        seen.append((float(total), float(torch.linalg.norm(torch.cat([p.grad.flatten() for p in params])))))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    _one_param_run(TrainConfig(steps=3, lr=0.1, max_grad_norm=1e-3), 3)
    assert len(seen) == 3 and all(before > 1e-3 and after == pytest.approx(1e-3, rel=1e-3) for before, after in seen)


def test_learning_rate_defaults_by_modality_and_bad_options_are_refused():
    assert TrainConfig().resolved("image").lr == DEFAULT_LR["image"] == 1e-3
    assert TrainConfig(head_lr=0.5).resolved("text").lr == 5e-3 and TrainConfig(head_lr=0.5).resolved("text").head_lr == 0.5
    assert TrainConfig(lr=0.2).resolved("image").head_lr == 0.2
    with pytest.raises(ValueError, match="modality"):
        TrainConfig().resolved("audio")
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=0)
    with pytest.raises(ValueError, match="lr is None"):
        train_steps(lambda xs, ys, reduction: None, [{"params": [torch.nn.Parameter(torch.zeros(1))]}], make_task("t"), TrainConfig())
