"""InfLoRA: interference-free low-rank adaptation (Liang & Li, CVPR 2024; METHODS.md §2).

Per task t and adapted layer: a down-projection ``A_t`` ``(r, d_in)`` designed before
training from the layer's input covariance with earlier tasks' input space projected out
(``A_t`` = top-r left singular vectors of ``Ĉ = C − M Mᵀ C``, transposed, times
``down_scale``), frozen; an up-projection ``B_t`` ``(d_out, r)``, zero-initialised, the
only trained adapter weight (Proposition 1: this is fine-tuning ``W`` with its update
restricted to the row space of ``A_t``). After the task: a second covariance pass,
the DualGPM memory update at threshold ``ε_t`` (rising linearly to 1 over the stream;
fixed at ``eps`` when the number of tasks is unknown), and the merge ``W ← W + B_t A_t``.

Inference is the merged backbone with every task's head concatenated (class-incremental,
no task id); with a task id, that task's head alone (task-incremental). The loss is the
cross-entropy of the current task's head only (InfLoRA's local CE).

Choices the paper leaves open, as we make them: the targets are sharecl's defaults for the
family (``query``/``value`` for BERT-like encoders, the same for every method; the official
ViT code adapts K and V); covariances use every non-padding token of the training texts
(the official code uses every ViT token under training augmentation); ``down_scale = 1/√3``
as in the official code.

Memory per layer **input**, as in the official code (K and V of a block read the same input,
keep one memory and get one designed down-projection): adapted modules whose first-task input
covariances are bitwise equal (they observed the same tensors: ``q_proj``/``v_proj``,
``query``/``value``) form one group with one :class:`~sharecl.gpm.DualGPM` and one ``A_t``,
stored once. The grouping is recorded in the store.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from sharecl.adapters.branches import InfLoRALinear
from sharecl.backbone import Backbone
from sharecl.data.tasks import Task
from sharecl.gpm import DualGPM, inflora_threshold, load_memories, memory_tensors, memory_threshold
from sharecl.inject import wrap_targets
from sharecl.methods.base import ContinualMethod
from sharecl.methods.registry import register
from sharecl.train import PeakRSS, TrainConfig

__all__ = ["InfLoRAConfig", "InfLoRAMethod"]


@dataclass
class InfLoRAConfig:
    """InfLoRA settings.

    Attributes:
        target_modules: PEFT-style targets; None = the family default.
        r: rank of each task's branch.
        eps: memory threshold ``ε`` at the first task (official configs: 0.95–0.98).
        down_scale: factor on the designed ``A_t`` (official code: ``1/√3``).
        lr: learning rate of ``B_t``; None = the run's ``lr``.
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    eps: float = 0.95
    down_scale: float = 1.0 / math.sqrt(3.0)
    lr: float | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be ≥ 1, got {self.r}")
        inflora_threshold(self.eps, 0, None)  # validates eps

    def to_dict(self) -> dict:
        return asdict(self)


@register
class InfLoRAMethod(ContinualMethod):
    """InfLoRA on any transformers encoder (task- and class-incremental).

    Attributes:
        layers: ``{module name: InfLoRALinear}``.
        groups: ``{representative module: [modules reading the same input]}`` (None before the
            first task).
        memory: ``{representative module: DualGPM}``, one per group.
    """

    name = "inflora"
    label = "InfLoRA"
    all_order = 1
    config_class = InfLoRAConfig
    scenarios = ("til", "cil")
    storable = True
    needs_data = True  # designs its adapter from the task's input covariances
    task_independent_backbone = True  # every task's B_t A_t is merged into W

    def __init__(self, encoder: Backbone, seed: int = 0, config: InfLoRAConfig | None = None, **overrides):
        super().__init__(encoder, seed)
        self.config = self.make_config(config, overrides, targets_from=encoder.model)
        self.layers: dict[str, InfLoRALinear] = wrap_targets(encoder.model, self.config.target_modules, lambda lin: InfLoRALinear(lin, self.router))
        self.groups: dict[str, list[str]] | None = None
        self.memory: dict[str, DualGPM] = {}
        self.thresholds: list[float] = []

    def _group_inputs(self, covs: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Group modules with bitwise-equal input covariances (one input) and give each group a memory."""
        groups: dict[str, list[str]] = {}
        for n in self.layers:
            rep = next((g for g in groups if covs[g].shape == covs[n].shape and torch.equal(covs[g], covs[n])), n)
            groups.setdefault(rep, []).append(n)
        self.groups = groups
        self.memory = {g: DualGPM(self.layers[g].in_features) for g in groups}
        return groups

    def memory_for(self, module: str) -> DualGPM:
        """The memory of ``module``'s input group.

        Raises:
            KeyError: for a module that is not adapted, or before the first task.
        """
        for g, members in (self.groups or {}).items():
            if module in members:
                return self.memory[g]
        raise KeyError(f"no InfLoRA memory for {module!r} (not an adapted module, or no task learned yet)")

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        head = self._add_task(task)
        covs = self.input_covariances(task.train_inputs, cfg.eval_batch_size)
        groups = self.groups if self.groups is not None else self._group_inputs(covs)
        params = []
        for g, members in groups.items():
            A = self.memory[g].design(covs[g], self.config.r).T * self.config.down_scale
            params += [self.layers[n].begin_task(A) for n in members]
        return [{"params": params, "lr": self.config.lr or cfg.lr}, *self._head_groups(head, cfg)]

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        covs = self.input_covariances(task.train_inputs, cfg.eval_batch_size)
        eps_t = memory_threshold(self.config.eps, len(self.task_names) - 1, self.num_tasks)
        self.thresholds.append(eps_t)
        if self.groups is None:
            raise RuntimeError("end_task before begin_task: InfLoRA designs its memory groups when a task begins")
        for g in self.groups:
            self.memory[g].update(covs[g], eps_t)
        for layer in self.layers.values():
            layer.merge()
        dims = [m.dim for m in self.memory.values()]
        return {"threshold": eps_t, "memory_dim_mean": sum(dims) / len(dims), "memory_dim_max": max(dims)}

    # -------------------------------------------------------------- accounting
    def adapter_numbers_per_task(self) -> float:
        """``B_t`` per module, ``A_t`` once per input group."""
        ins = [self.layers[g].in_features for g in self.groups] if self.groups else [m.in_features for m in self.layers.values()]
        return float(self.config.r * (sum(ins) + sum(m.out_features for m in self.layers.values())))

    def shared_numbers(self) -> int:
        return sum(m.numel for m in self.memory.values())

    def trainable_numbers_last_task(self) -> int:
        return self.config.r * sum(m.out_features for m in self.layers.values())

    # -------------------------------------------------------------------- store
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Each task's merged factors, ``B_t`` per module and ``A_t`` per input group (its first
        module's name; ``W = W0 + Σ_t B_t A_t`` is rebuilt in the same order on load, so it is
        bit-identical), the memory bases (one per group), the heads."""
        out = {**self.head_tensors(), **memory_tensors(self.memory)[0]}
        for g, members in (self.groups or {}).items():
            for t, (_, A) in enumerate(self.layers[g].merged):
                out[f"layers.{g}.A.{t}"] = A.contiguous()
            for n in members:
                for t, (B, _) in enumerate(self.layers[n].merged):
                    out[f"layers.{n}.B.{t}"] = B.contiguous()
        return out

    def state_meta(self) -> dict:
        return {"memory_kinds": memory_tensors(self.memory)[1], "merged_tasks": len(self.task_names),
                "thresholds": self.thresholds, "input_groups": self.groups}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        # stores written before input groups existed kept one memory and one A_t per module
        groups = meta.get("input_groups") or ({n: [n] for n in self.layers} if meta["merged_tasks"] else None)
        for g, members in (groups or {}).items():
            for t in range(meta["merged_tasks"]):
                A = tensors[f"layers.{g}.A.{t}"]
                for n in members:
                    B = tensors[f"layers.{n}.B.{t}"]
                    self.layers[n].base.weight += B @ A
                    self.layers[n].merged.append((B, A))
        self.groups = groups
        self.memory = load_memories({g: self.layers[g].in_features for g in groups or {}}, tensors, meta["memory_kinds"])
        self.thresholds = list(meta.get("thresholds", []))
        self.load_tasks_and_heads(tensors, tasks)

    def report(self) -> dict:
        return {"memory_dims": {n: m.dim for n, m in self.memory.items()}, "thresholds": self.thresholds,
                "input_groups": self.groups}
