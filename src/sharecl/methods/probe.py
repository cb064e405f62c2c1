"""``head-only``: the frozen backbone with one trained linear head per task (a linear probe).

Not a continual method of the founding papers: the reference that says how much of any
method's accuracy the adapters add over the heads alone. It stores no adapter and cannot
forget (heads are per task and the backbone never changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sharecl.data.tasks import Task
from sharecl.methods.base import ContinualMethod, register
from sharecl.train import PeakRSS, TrainConfig

__all__ = ["HeadOnlyMethod"]


@dataclass
class HeadOnlyConfig:
    """No options; present so every method reports a config."""

    def to_dict(self) -> dict:
        return asdict(self)


@register
class HeadOnlyMethod(ContinualMethod):
    """Frozen backbone, per-task linear heads (task-incremental; class-incremental by concatenating heads)."""

    name = "head-only"
    config_class = HeadOnlyConfig
    scenarios = ("til", "cil")

    def __init__(self, encoder, seed: int = 0, **overrides):
        super().__init__(encoder, seed)
        self.config = HeadOnlyConfig()

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        return [{"params": list(self._add_task(task).parameters()), "lr": cfg.head_lr}]

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        return {}

    def logits(self, inputs: list, task_name: str, training: bool = False) -> torch.Tensor:
        self.check_task(task_name)
        return self._encode_head(inputs, task_name, training)

    def adapter_numbers_per_task(self) -> float:
        return 0.0

    def trainable_numbers_last_task(self) -> int:
        return 0
