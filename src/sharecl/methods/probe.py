"""``head-only``: the frozen backbone with one trained linear head per task (a linear probe).

Not a continual method of the founding papers: the reference that says how much of any
method's accuracy the adapters add over the heads alone. It stores no adapter and cannot
forget (heads are per task and the backbone never changes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from sharecl.data.tasks import Task
from sharecl.methods.base import ContinualMethod
from sharecl.methods.registry import register
from sharecl.objectives import GENERATION, objective_of
from sharecl.train import PeakRSS, TrainConfig

__all__ = ["HeadOnlyMethod", "ZeroShotMethod"]


@dataclass
class HeadOnlyConfig:
    """No options; present so every method reports a config."""

    def to_dict(self) -> dict:
        return asdict(self)


@register
class HeadOnlyMethod(ContinualMethod):
    """Frozen backbone, per-task linear heads (task-incremental; class-incremental by concatenating heads)."""

    name = "head-only"
    label = "head-only"
    all_order = 7
    config_class = HeadOnlyConfig
    scenarios: ClassVar[tuple[str, ...]] = ("til", "cil")
    task_kinds: ClassVar[tuple[str, ...]] = ("classification",)  # without a head it is the zero-shot model: see ZeroShotMethod
    task_independent_backbone = True  # the backbone never changes
    isolated_tasks = True  # each task trains only its own head

    def __init__(self, encoder, seed: int = 0, **overrides):
        super().__init__(encoder, seed)
        self.config = HeadOnlyConfig()

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        return self._head_groups(self._add_task(task), cfg)

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        return {}

    def adapter_numbers_per_task(self) -> float:
        return 0.0

    def trainable_numbers_last_task(self) -> int:
        return 0


@register
class ZeroShotMethod(HeadOnlyMethod):
    """The base model as it is: the floor row of a generation stream (METHODS.md §6). Nothing is
    trained; every task is answered by the frozen pretrained causal LM."""

    name = "zero-shot"
    label = "zero-shot"
    all_order = 8
    scenarios: ClassVar[tuple[str, ...]] = ("til",)
    trains = False
    task_kinds: ClassVar[tuple[str, ...]] = ("generation",)  # the zero-shot model answers generation tasks only

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        if objective_of(task) is not GENERATION:
            raise ValueError(f"zero-shot answers generation tasks; {task.name!r} is a classification task: use head-only")
        self._add_task(task)
        return []
