"""One training loop and one evaluation loop for every method.

A method exposes ``logits(batch, task_name)`` and the list of parameters to train; this
module samples seeded mini-batches, steps AdamW on cross-entropy, shows a progress bar,
and refuses a non-finite loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import psutil
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from sharecl.data.tasks import Task

__all__ = ["TrainConfig", "NonFiniteLossError", "train_steps", "predict_logits", "evaluate", "PeakRSS"]


@dataclass
class TrainConfig:
    """Training budget shared by all methods of a comparison.

    Attributes:
        steps: optimiser steps per task.
        batch_size: examples per step.
        lr: AdamW learning rate for adapter parameters.
        head_lr: AdamW learning rate for the task head.
        weight_decay: AdamW weight decay (adapters and heads).
        eval_batch_size: examples per forward pass at evaluation.
        max_length: tokens per text (longer texts are truncated).
        seed: seeds batch order and every random init.
    """

    steps: int = 60
    batch_size: int = 16
    lr: float = 5e-3
    head_lr: float = 5e-3
    weight_decay: float = 0.0
    eval_batch_size: int = 64
    max_length: int = 64
    seed: int = 0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the task is not stored."""


class PeakRSS:
    """Tracks the peak resident set size (bytes) of this process while sampled."""

    def __init__(self):
        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss

    def sample(self) -> None:
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` index batches from seeded epoch-wise permutations of ``range(n)``."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos: pos + batch_size].tolist()
        pos += batch_size


def train_steps(forward: Callable[[list], torch.Tensor], param_groups: Sequence[dict], task: Task, cfg: TrainConfig,
                *, steps: int | None = None, desc: str = "", generator: torch.Generator | None = None,
                rss: PeakRSS | None = None, progress: bool = True) -> list[float]:
    """Train on ``task``'s training split; returns the loss of every step.

    Args:
        forward: maps a list of raw inputs to logits ``(N, num_classes)``.
        param_groups: AdamW parameter groups (``{"params": [...], "lr": ...}``).
        steps: overrides ``cfg.steps``.

    Raises:
        NonFiniteLossError: at the first NaN/inf loss, naming the task and the step.
    """
    steps = cfg.steps if steps is None else steps
    groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
    if not groups or steps <= 0:
        return []
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = generator or torch.Generator().manual_seed(cfg.seed)
    labels = torch.tensor(task.train_labels)
    losses = []
    bar = tqdm(_batches(len(task.train_inputs), min(cfg.batch_size, len(task.train_inputs)), steps, gen),
               total=steps, desc=desc or f"train {task.name}", disable=not progress, leave=False, dynamic_ncols=True)
    for step, idx in enumerate(bar):
        logits = forward([task.train_inputs[i] for i in idx])
        loss = F.cross_entropy(logits, labels[idx])
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at step {step} of task {task.name!r}; lower the learning rate "
                f"(now {cfg.lr}) or check the data; nothing was stored")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if rss is not None:
            rss.sample()
        if step % 5 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


@torch.no_grad()
def predict_logits(forward: Callable[[list], torch.Tensor], inputs: list, batch_size: int) -> torch.Tensor:
    """Logits ``(N, C)`` for ``inputs`` in batches (no gradients)."""
    outs = [forward(inputs[i: i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(forward: Callable[[list], torch.Tensor], task: Task, batch_size: int) -> float:
    """Accuracy (fraction in [0, 1]) on ``task``'s test split."""
    if not task.test_inputs:
        return float("nan")
    pred = predict_logits(forward, task.test_inputs, batch_size).argmax(-1)
    return (pred == torch.tensor(task.test_labels)).float().mean().item()
