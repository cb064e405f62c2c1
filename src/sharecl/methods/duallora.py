"""DualLoRA: orthogonal + residual adapters with a dynamic memory (METHODS.md §4).

After Chen et al., "Dual Low-Rank Adaptation for Continual Learning with Pre-Trained
Models" (arXiv 2411.00623; later "Replay-Free Continual Low-Rank Adaptation with Dynamic
Memory"). **What follows the paper's abstract**: two LoRA adapters per layer beside the
frozen weight; an *orthogonal adapter* updated in a subspace orthogonal to earlier tasks';
a *residual adapter* per task on task-specific bases with no interaction across tasks; a
*dynamic memory* weighing them at inference; task identity predicted with a confidence and
the logits calibrated by it. **What is ours** (the paper's equations were not available to
us; see ``../shared/reference/peers.md`` §3):

- Orthogonal adapter: a LoRA pair ``(A_O, B_O)`` per task whose down-projection is
  ``A_O (I − M Mᵀ)`` (GPM's projection, written as a parametrisation because projecting
  gradients does not survive Adam's per-coordinate scaling), so its update is exactly zero
  on every earlier task's input space ``M``; merged into ``W`` after the task. ``M`` is the
  same DualGPM memory as InfLoRA's (threshold rising from ``eps`` to 1 over the stream).
- Residual adapter of task t: ``R_t U_t`` with ``U_t`` ``(r_res, d_in)`` the top directions of
  task t's input covariance outside ``M`` (frozen) and ``R_t`` ``(d_out, r_res)`` trained
  from zero, then frozen.
- Dynamic memory: relevance ``ρ_t(x) = e_t(x) / ē_t`` per layer, with ``e_t(x)`` the share of a
  sequence's input energy inside ``U_t`` and ``ē_t`` the same share on task t's training
  data; residual adapters are weighted by ``softmax_t(ρ_t / temperature)``. In training and
  with a task id the weights are one-hot on the task.
- Task identity: ``t̂ = argmax`` of ``ρ`` averaged over layers; confidence = the margin
  between the two largest softmax weights (1 with one task; a margin rather than the top
  weight, which is ≥ 1/T even for a tie); when the confidence is ≥ ``confidence``, logits
  outside ``t̂``'s classes are masked (calibration); otherwise all heads' logits are
  compared as they are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from sharecl.adapters.branches import DualLoRALinear
from sharecl.backbone import Backbone
from sharecl.data.tasks import Task
from sharecl.gpm import DualGPM, inflora_threshold, load_memories, memory_tensors, memory_threshold
from sharecl.inject import wrap_targets
from sharecl.methods.base import ContinualMethod
from sharecl.methods.registry import register
from sharecl.train import PeakRSS, TrainConfig

__all__ = ["DualLoRAConfig", "DualLoRAMethod"]


@dataclass
class DualLoRAConfig:
    """DualLoRA settings ([ours], see the module docstring).

    Attributes:
        target_modules: PEFT-style targets; None = the family default.
        r: rank of the orthogonal adapter.
        lora_alpha: its scaling numerator (``s = lora_alpha / r``).
        residual_rank: ``r_res``, rank of each task's residual adapter.
        eps: memory threshold at the first task.
        temperature: softmax temperature of the dynamic-memory weights and task identity.
        confidence: task-identity margin (top minus second softmax weight) at or above which
            logits are calibrated.
        lr: adapter learning rate; None = the run's ``lr``.
        orthogonal: train the orthogonal adapter (default). False is an **ablation** that keeps
            only the residual adapters and the heads (the shared weight ``W`` never changes, so
            every forgetting left comes from the dynamic memory's weights); it measures what
            the orthogonal adapter costs old tasks. Its zero factors are still stored, and
            counted in the bytes per task.
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16.0
    residual_rank: int = 4
    eps: float = 0.95
    temperature: float = 0.1
    confidence: float = 0.5
    lr: float | None = None
    orthogonal: bool = True

    def __post_init__(self):
        if not isinstance(self.orthogonal, bool):
            raise ValueError(f"orthogonal must be true or false, got {self.orthogonal!r}")
        if self.r < 1 or self.residual_rank < 1:
            raise ValueError(f"r and residual_rank must be ≥ 1, got {self.r} and {self.residual_rank}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        inflora_threshold(self.eps, 0, None)

    def to_dict(self) -> dict:
        return asdict(self)


@register
class DualLoRAMethod(ContinualMethod):
    """DualLoRA on any transformers encoder (task- and class-incremental).

    Attributes:
        layers: ``{module name: DualLoRALinear}``.
        memory: ``{module name: DualGPM}``.
        last_task_prediction: ``(predicted task index (N,), confidence (N,))`` of the last
            class-incremental forward, for diagnostics.
    """

    name = "dual-lora"
    label = "DualLoRA"
    all_order = 3
    config_class = DualLoRAConfig
    scenarios = ("til", "cil")
    storable = True
    needs_data = True  # designs its adapter from the task's input covariances

    def __init__(self, encoder: Backbone, seed: int = 0, config: DualLoRAConfig | None = None, **overrides):
        super().__init__(encoder, seed)
        self.config = self.make_config(config, overrides, targets_from=encoder.model)
        cfg = self.config
        self.layers: dict[str, DualLoRALinear] = wrap_targets(encoder.model, cfg.target_modules,
                                   lambda lin: DualLoRALinear(lin, cfg.lora_alpha / cfg.r, self.router, cfg.temperature))
        self.memory = {n: DualGPM(m.in_features) for n, m in self.layers.items()}
        self.last_task_prediction: tuple[torch.Tensor, torch.Tensor] | None = None

    def routed(self, task_name: str, training: bool = False):
        """Task ``task_name``'s residual adapter alone (training and task-incremental inference)."""
        self.check_task(task_name)
        return self.router.use(task_index=self.task_names.index(task_name))

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        head = self._add_task(task)
        with self.router.nowhere():
            covs = self.input_covariances(task.train_inputs, cfg.eval_batch_size)
        gen = self.generator(9)
        params = []
        for n, layer in self.layers.items():
            mem = self.memory[n]
            A_O, B_O, R_t = layer.begin_task(self.config.r, mem.design(covs[n], self.config.residual_rank).T, mem.protected(), gen)
            params += [A_O, B_O, R_t] if self.config.orthogonal else [R_t]  # ablation: B_O stays 0, W never moves
        return [{"params": params, "lr": self.config.lr or cfg.lr}, *self._head_groups(head, cfg)]

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        t = len(self.task_names) - 1
        with self.router.use(task_index=t):
            covs = self.input_covariances(task.train_inputs, cfg.eval_batch_size)
        eps_t = memory_threshold(self.config.eps, t, self.num_tasks)
        shares = []
        for n, layer in self.layers.items():
            C = covs[n]
            U = layer.U[-layer.res_ranks[-1]:].double()
            shares.append(float(torch.trace(U @ C @ U.T) / torch.trace(C).clamp_min(1e-12)))  # ē_t
            self.memory[n].update(C, eps_t)
            layer.end_task(shares[-1])
        dims = [m.dim for m in self.memory.values()]
        return {"threshold": eps_t, "memory_dim_mean": sum(dims) / len(dims), "residual_energy_mean": sum(shares) / len(shares)}

    @torch.no_grad()
    def cil_features(self, inputs: list) -> torch.Tensor:
        """The dynamic-memory features :meth:`cil_logits` feeds every head (no task routing)."""
        with self.router.nowhere():
            return self._features(inputs)

    @torch.no_grad()
    def cil_logits(self, inputs: list) -> torch.Tensor:
        """Dynamic-memory forward, then task identity and calibration (see module docstring)."""
        relevance: list[torch.Tensor] = []  # every layer's ρ (N, T) of this forward, through the route
        with self.router.nowhere(), self.router.use(relevance=relevance):
            logits = self._concat_heads(self._features(inputs))
        rho = torch.stack(relevance).mean(0)  # (N, T)
        p = torch.softmax(rho / self.config.temperature, -1)
        top = p.topk(min(2, p.shape[-1]), -1)
        pred = top.indices[:, 0]
        conf = top.values[:, 0] - (top.values[:, 1] if p.shape[-1] > 1 else 0.0)
        self.last_task_prediction = (pred, conf)
        offsets, sizes = self.class_offsets(), [len(self.task_classes[t]) for t in self.task_names]
        keep = torch.zeros_like(logits, dtype=torch.bool)
        for i, (t, c) in enumerate(zip(pred.tolist(), conf.tolist())):
            if c >= self.config.confidence:
                o = offsets[self.task_names[t]]
                keep[i, o: o + sizes[t]] = True
            else:
                keep[i] = True
        return logits.masked_fill(~keep, float("-inf"))

    # -------------------------------------------------------------- accounting
    def adapter_numbers_per_task(self) -> float:
        c = self.config
        return float(sum(c.r * (m.in_features + m.out_features) + c.residual_rank * (m.in_features + m.out_features) + 1
                         for m in self.layers.values()))

    def shared_numbers(self) -> int:
        return sum(m.numel for m in self.memory.values())

    def trainable_numbers_last_task(self) -> int:
        c = self.config
        r = c.r if c.orthogonal else 0
        return sum(r * (m.in_features + m.out_features) + c.residual_rank * m.out_features for m in self.layers.values())

    # -------------------------------------------------------------------- store
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Per layer: each task's merged orthogonal factors, the residual bases ``U`` and
        up-projections ``R``, ``ē`` and the memory basis; and the heads."""
        out = {**self.head_tensors(), **memory_tensors(self.memory)[0]}
        for n, layer in self.layers.items():
            for t, (B, A) in enumerate(layer.merged):
                out[f"layers.{n}.B_O.{t}"], out[f"layers.{n}.A_O.{t}"] = B.contiguous(), A.contiguous()
            out[f"layers.{n}.U"], out[f"layers.{n}.R"] = layer.U.contiguous(), layer.R.contiguous()
            out[f"layers.{n}.energy_mean"] = torch.tensor(layer.energy_mean, dtype=torch.float64)
        return out

    def state_meta(self) -> dict:
        """Memory kinds and the residual rank of each task (one list, equal in every layer).

        Raises:
            RuntimeError: if the layers disagree or do not hold one residual adapter per task
                (a store written from such a state could not be read back).
        """
        ranks = [list(layer.res_ranks) for layer in self.layers.values()]
        if any(r != ranks[0] for r in ranks) or len(ranks[0]) != len(self.task_names):
            raise RuntimeError(f"DualLoRA's residual ranks are inconsistent ({ranks[0]} for {len(self.task_names)} tasks); "
                               f"refusing to write a store that could not be read back")
        return {"memory_kinds": memory_tensors(self.memory)[1], "residual_ranks": ranks[0]}

    @torch.no_grad()
    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        ranks = list(meta["residual_ranks"])
        if len(ranks) != len(tasks):
            raise ValueError(f"{len(ranks)} residual ranks for {len(tasks)} tasks")
        for n, layer in self.layers.items():
            for t in range(len(ranks)):
                B, A = tensors[f"layers.{n}.B_O.{t}"], tensors[f"layers.{n}.A_O.{t}"]
                layer.base.weight += layer.scaling * (B @ A)
                layer.merged.append((B, A))
            layer.U, layer.R = tensors[f"layers.{n}.U"], tensors[f"layers.{n}.R"]
            layer.res_ranks = list(ranks)  # each layer its own list: begin_task appends to it
            layer.energy_mean = tensors[f"layers.{n}.energy_mean"].tolist()
            if layer.U.shape[0] != sum(ranks) or layer.R.shape[1] != sum(ranks):
                raise ValueError(f"layer {n}: residual ranks {ranks} do not match U {tuple(layer.U.shape)}")
        self.memory = load_memories({n: m.in_features for n, m in self.layers.items()}, tensors, meta["memory_kinds"])
        self.load_tasks_and_heads(tensors, tasks)

    def report(self) -> dict:
        return {"memory_dims": {n: m.dim for n, m in self.memory.items()}}
