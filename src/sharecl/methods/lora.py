"""The LoRA baselines, on real PEFT LoRA adapters (METHODS.md §5).

- ``lora-per-task``: a separate PEFT LoRA per task, chosen by task id (the task-incremental
  reference; storage grows with the number of tasks).
- ``seq-lora``: one PEFT LoRA trained through all tasks in order (the forgetting floor).
- ``joint-lora``: one PEFT LoRA trained on all tasks at once (the non-continual ceiling).

Both use the same rank, targets, scaling, steps and seed as Share; heads are per task.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sharecl.backbone import Backbone
from sharecl.data.tasks import Task
from sharecl.inject import find_targets
from sharecl.methods.base import ContinualMethod
from sharecl.methods.registry import register
from sharecl.objectives import GENERATION, objective_of
from sharecl.train import PeakRSS, TrainConfig

__all__ = ["LoRAConfig", "LoRAPerTaskMethod", "SeqLoRAMethod", "JointLoRAMethod"]


@dataclass
class LoRAConfig:
    """PEFT LoRA settings shared by the LoRA baselines.

    Attributes:
        target_modules: PEFT-style targets; None = the family default.
        r: LoRA rank.
        lora_alpha: scaling numerator (``s = lora_alpha / r``).
        lora_dropout: dropout on the LoRA input.
        lr: learning rate of the LoRA factors; None = the run's ``lr`` (heads always use ``head_lr``).
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lr: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class _PeftLoRA(ContinualMethod):
    """Common PEFT plumbing: one ``PeftModel`` around the backbone, adapters by name."""

    config_class = LoRAConfig
    resumable = True  # state hooks for per-task checkpoints (sharecl.resume); no store format

    def __init__(self, encoder: Backbone, seed: int = 0, config: LoRAConfig | None = None, **overrides):
        super().__init__(encoder, seed)
        self.config = self.make_config(config, overrides, targets_from=encoder.model)
        targets = find_targets(encoder.model, self.config.target_modules)
        dims = [encoder.model.get_submodule(n) for n in targets]
        self._adapter_numbers = self.config.r * sum(m.in_features + m.out_features for m in dims)
        self.peft_model: Any = None  # a peft.PeftModel once the first adapter exists

    def _lora_config(self):
        from peft import LoraConfig

        c = self.config
        return LoraConfig(r=c.r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=c.target_modules)

    def _ensure_adapter(self, adapter: str) -> list[torch.nn.Parameter]:
        """Create PEFT adapter ``adapter`` if missing (seeded init); make only it trainable."""
        from peft import get_peft_model

        torch.manual_seed(self.seed * 100_003 + len(self.task_names))
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.encoder.model, self._lora_config(), adapter_name=adapter)
            self.encoder.model = self.peft_model
        elif adapter not in self.peft_model.peft_config:
            self.peft_model.add_adapter(adapter, self._lora_config())
        self.peft_model.set_adapter(adapter)
        params = []
        for n, p in self.peft_model.named_parameters():
            mine = f".{adapter}." in n and ("lora_A" in n or "lora_B" in n)
            p.requires_grad_(mine)
            if mine:
                params.append(p)
        return params

    def _adapter_of(self, task_name: str) -> str:
        raise NotImplementedError

    @contextlib.contextmanager
    def routed(self, task_name: str, training: bool = False):
        """The task's PEFT adapter made active (PEFT's ``set_adapter``; it stays active after the
        block, since switching walks every module: not once per step). PEFT keeps the active
        adapter on its layers, so two threads must not route one PEFT model to two tasks at once."""
        self.check_task(task_name)
        adapter = self._adapter_of(task_name)
        if self.peft_model.active_adapter != adapter:
            self.peft_model.set_adapter(adapter)
        yield

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        head = self._add_task(task)
        params = self._ensure_adapter(self._adapter_of(task.name))
        return [{"params": params, "lr": self.config.lr or cfg.lr}, *self._head_groups(head, cfg)]

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        for p in self.peft_model.parameters():
            p.requires_grad_(False)
        return {}

    def trainable_numbers_last_task(self) -> int:
        return self._adapter_numbers

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Heads and every PEFT adapter's LoRA factors (``peft.<PEFT parameter name>``)."""
        out = self.head_tensors()
        if self.peft_model is not None:
            out.update({f"peft.{n}": p.detach().contiguous() for n, p in self.peft_model.named_parameters() if "lora_" in n})
        return out

    def state_meta(self) -> dict:
        return {"adapters": list(self.peft_model.peft_config) if self.peft_model is not None else []}

    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        """Inverse of :meth:`state_tensors`: the tasks and heads, then each adapter created (in its
        original order) and its factors copied in.

        Raises:
            ValueError: a saved factor that the rebuilt adapters do not have, or one missing.
        """
        self.load_tasks_and_heads(tensors, tasks)
        for adapter in meta.get("adapters", []):
            self._ensure_adapter(adapter)
        saved = {k.removeprefix("peft."): v for k, v in tensors.items() if k.startswith("peft.")}
        params = dict(self.peft_model.named_parameters()) if self.peft_model is not None else {}
        mine = {n for n in params if "lora_" in n}
        if set(saved) != mine:
            raise ValueError(f"the saved LoRA factors do not match the rebuilt adapters ({len(saved)} saved, {len(mine)} built)")
        with torch.no_grad():
            for n, v in saved.items():
                params[n].copy_(v)
                params[n].requires_grad_(False)


@register
class LoRAPerTaskMethod(_PeftLoRA):
    """A separate PEFT LoRA adapter for each task, selected by task id at test time."""

    name = "lora-per-task"
    label = "LoRA per task"
    all_order = 4
    isolated_tasks = True  # each task trains only its own adapter (and head)

    def _adapter_of(self, task_name: str) -> str:
        return f"task-{task_name}"  # a bare name like "a" would clash with PEFT's "lora_" prefix check

    def adapter_numbers_per_task(self) -> float:
        return float(self._adapter_numbers)


@register
class SeqLoRAMethod(_PeftLoRA):
    """One PEFT LoRA adapter trained on every task in turn (no protection against forgetting)."""

    name = "seq-lora"
    label = "SeqLoRA"
    all_order = 5
    scenarios = ("til", "cil")
    task_independent_backbone = True  # one adapter, active for every task

    def _adapter_of(self, task_name: str) -> str:
        return "seq"

    def adapter_numbers_per_task(self) -> float:
        return 0.0

    def shared_numbers(self) -> int:
        return self._adapter_numbers


@register
class JointLoRAMethod(_PeftLoRA):
    """Joint LoRA: one PEFT LoRA trained on the union of all tasks at once (METHODS.md §5).

    The non-continual ceiling. It trains for ``steps × number of tasks`` steps (the budget
    every continual method spends over the whole stream) on batches drawn from the union.
    Loss: in a task-incremental stream, each example's cross-entropy over its own task's
    classes (per-task heads); in a class-incremental stream, cross-entropy over every class
    of the stream (all heads concatenated). Only the final accuracy row exists.
    """

    name = "joint-lora"
    label = "joint LoRA"
    all_order = 6
    scenarios = ("til", "cil")
    task_independent_backbone = True  # one adapter, active for every task
    joint = True

    def _adapter_of(self, task_name: str) -> str:
        return "joint"

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        raise RuntimeError("joint-lora is not continual: call learn_all(tasks, ...) with every task at once")

    def learn_all(self, tasks: list[Task], cfg: TrainConfig, scenario: str = "til", *, rss: PeakRSS | None = None,
                  progress: bool = True) -> dict:
        """Train the adapter and every head on the union of ``tasks``; returns ``{"final_loss"}``."""
        from sharecl.train import train_steps

        self.check_scenario(scenario)
        cfg = cfg.resolved(self.modality)
        heads = [self._add_task(t) for t in tasks]
        params = self._ensure_adapter("joint")
        if all(objective_of(t) is GENERATION for t in tasks):  # one causal-LM loss over every task's pairs
            from sharecl.generation.tasks import GenerationTask

            union = GenerationTask("joint", [ex for t in tasks for ex in t.train_inputs], [])
            def lm_forward(xs, ys, reduction="mean"):  # the joint adapter, reached through the first task's name
                return self.lm_loss_terms(xs, tasks[0].name, training=True, reduction=reduction)

            losses = train_steps(lm_forward, [{"params": params, "lr": self.config.lr or cfg.lr}],
                                 union, cfg, steps=cfg.steps * len(tasks), desc=f"{self.name} · all tasks",
                                 generator=self.generator(11), rss=rss, progress=progress)
            for p in self.peft_model.parameters():
                p.requires_grad_(False)
            return {"final_loss": losses[-1] if losses else None}
        offsets = self.class_offsets()
        inputs, labels, classes = [], [], []
        for i, t in enumerate(tasks):
            inputs += [(i, x) for x in t.train_inputs]
            labels += [offsets[t.name] + y for y in t.train_labels]
            classes += [f"{t.name}/{c}" for c in t.classes]
        joint = Task("joint", classes, inputs, labels, [], [])
        bounds = [(offsets[t.name], offsets[t.name] + t.num_classes) for t in tasks]

        def forward(batch: list, ys: torch.Tensor, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
            logits = self._concat_heads(self._features([x for _, x in batch]))
            if scenario == "til":  # each example competes only within its own task's classes
                keep = torch.zeros_like(logits, dtype=torch.bool)
                for row, (i, _) in enumerate(batch):
                    keep[row, bounds[i][0]: bounds[i][1]] = True
                logits = logits.masked_fill(~keep, float("-inf"))
            return torch.nn.functional.cross_entropy(logits, ys, reduction=reduction), torch.tensor(float(len(batch)))

        groups = [{"params": params, "lr": self.config.lr or cfg.lr},
                  {"params": [p for h in heads if h is not None for p in h.parameters()], "lr": cfg.head_lr}]
        losses = train_steps(forward, groups, joint, cfg, steps=cfg.steps * len(tasks), desc=f"{self.name} · all tasks",
                             generator=self.generator(11), rss=rss, progress=progress, some_unused=True)
        for p in self.peft_model.parameters():
            p.requires_grad_(False)
        return {"final_loss": losses[-1] if losses else None}

    def adapter_numbers_per_task(self) -> float:
        return 0.0

    def shared_numbers(self) -> int:
        return self._adapter_numbers
