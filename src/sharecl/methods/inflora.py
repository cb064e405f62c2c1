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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from sharecl.adapters.branches import InfLoRALinear
from sharecl.backbone import Encoder
from sharecl.data.tasks import Task
from sharecl.gpm import DualGPM, inflora_threshold, load_memories, memory_tensors, memory_threshold
from sharecl.inject import default_targets, wrap_targets
from sharecl.methods.base import ContinualMethod, register
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
        memory: ``{module name: DualGPM}``.
    """

    name = "inflora"
    config_class = InfLoRAConfig
    scenarios = ("til", "cil")
    storable = True
    needs_data = True  # designs its adapter from the task's input covariances
    task_independent_backbone = True  # every task's B_t A_t is merged into W

    def __init__(self, encoder: Encoder, seed: int = 0, config: InfLoRAConfig | None = None, **overrides):
        super().__init__(encoder, seed)
        self.config = config or InfLoRAConfig(**overrides)
        self.config.target_modules = self.config.target_modules or default_targets(encoder.model)
        self.layers = wrap_targets(encoder.model, self.config.target_modules, lambda lin: InfLoRALinear(lin, self.router))
        self.memory = {n: DualGPM(m.in_features) for n, m in self.layers.items()}
        self.thresholds: list[float] = []

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        head = self._add_task(task)
        covs = self.input_covariances(task.train_inputs, cfg.eval_batch_size)
        params = []
        for n, layer in self.layers.items():
            A = self.memory[n].design(covs[n], self.config.r).T
            params.append(layer.begin_task(A * self.config.down_scale))
        return [{"params": params, "lr": self.config.lr or cfg.lr}, *self._head_groups(head, cfg)]

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        covs = self.input_covariances(task.train_inputs, cfg.eval_batch_size)
        eps_t = memory_threshold(self.config.eps, len(self.task_names) - 1, self.num_tasks)
        self.thresholds.append(eps_t)
        for n, layer in self.layers.items():
            self.memory[n].update(covs[n], eps_t)
            layer.merge()
        dims = [m.dim for m in self.memory.values()]
        return {"threshold": eps_t, "memory_dim_mean": sum(dims) / len(dims), "memory_dim_max": max(dims)}

    # -------------------------------------------------------------- accounting
    def adapter_numbers_per_task(self) -> float:
        return float(self.config.r * sum(m.in_features + m.out_features for m in self.layers.values()))

    def shared_numbers(self) -> int:
        return sum(m.numel for m in self.memory.values())

    def trainable_numbers_last_task(self) -> int:
        return self.config.r * sum(m.out_features for m in self.layers.values())

    # -------------------------------------------------------------------- store
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Each task's merged factors ``B_t``, ``A_t`` per layer (``W = W0 + Σ_t B_t A_t`` is
        rebuilt in the same order on load, so it is bit-identical), the memory bases, the heads."""
        out = {**self.head_tensors(), **memory_tensors(self.memory)[0]}
        for n, layer in self.layers.items():
            for t, (B, A) in enumerate(layer.merged):
                out[f"layers.{n}.B.{t}"], out[f"layers.{n}.A.{t}"] = B.contiguous(), A.contiguous()
        return out

    def state_meta(self) -> dict:
        return {"memory_kinds": memory_tensors(self.memory)[1], "merged_tasks": len(self.task_names),
                "thresholds": self.thresholds}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        for n, layer in self.layers.items():
            for t in range(meta["merged_tasks"]):
                B, A = tensors[f"layers.{n}.B.{t}"], tensors[f"layers.{n}.A.{t}"]
                layer.base.weight += B @ A
                layer.merged.append((B, A))
        self.memory = load_memories({n: m.in_features for n, m in self.layers.items()}, tensors, meta["memory_kinds"])
        self.thresholds = list(meta.get("thresholds", []))
        self.load_tasks_and_heads(tensors, tasks)

    def report(self) -> dict:
        return {"memory_dims": {n: m.dim for n, m in self.memory.items()}, "thresholds": self.thresholds}
