"""SD-LoRA (published first as S-LoRA): decoupled direction and magnitude (Wu et al., ICLR 2025).

METHODS.md §3. Per task k and adapted layer a LoRA ``B_k A_k``; once its task ends it is
stored as a unit-Frobenius-norm *direction* ``D_k = B_k A_k / ‖B_k A_k‖_F`` and frozen, with
one scalar *magnitude* ``α_k`` shared by every adapted layer:
``W = W0 + Σ_{k<t} α_k D_k + α_t s B_t A_t`` (paper Eq. 4). While task t trains: ``A_t``,
``B_t``, **all** magnitudes ``α_1 … α_t`` and the task head. Inference uses the last model
only (no task id: heads concatenated, class-incremental; with a task id its head alone).
Loss: cross-entropy over the current task's classes (the official code's local CE).

Variants (options, and registered as ``sd-lora-rr`` / ``sd-lora-kd``):

- **RR** (rank reduction): tasks 5–8 get rank ``round(0.8 r)``, tasks 9 on ``round(0.6 r)``
  (the paper's 10 → 8 → 6 after tasks 4 and 8).
- **KD** (knowledge distillation by least squares): after task t, fit ``D_t`` (all layers
  flattened together) by ``Σ_k β_k D_k``; if the relative squared residual
  ``‖D_t − Σ β_k D_k‖² / ‖D_t‖²`` is ≤ ``kd_threshold`` (paper: 9e-4), drop ``D_t`` and add
  ``α_t β_k`` to each old ``α_k``. The fit uses Gram matrices of the factors
  (``⟨B_i A_i, B_j A_j⟩_F = tr((B_iᵀB_j)(A_j A_iᵀ))``), never the dense ``d_out × d_in`` products.

Where we differ from the official code, on purpose: (1) old directions are normalised by
``‖B A‖_F`` as the paper says, not by ``‖B‖_F ‖A‖_F``; (2) when a task ends, its magnitude
is set to the least-squares fit of its trained update, ``α_t ← α_t · mean_layers ‖s B_t A_t‖_F``,
so the model's function moves as little as one shared scalar allows (the official code
switches to the normalised form with ``α = 0.8``, a jump); (3) magnitudes are carried across
tasks (HEAD of the official code re-initialises them each task).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from sharecl.adapters.branches import SDLoRALinear
from sharecl.backbone import Backbone
from sharecl.data.tasks import Task
from sharecl.inject import wrap_targets
from sharecl.methods.base import ContinualMethod
from sharecl.methods.registry import register
from sharecl.train import PeakRSS, TrainConfig

__all__ = ["SDLoRAConfig", "SDLoRAMethod", "SDLoRARRMethod", "SDLoRAKDMethod", "gram_of_directions"]


@dataclass
class SDLoRAConfig:
    """SD-LoRA settings.

    Attributes:
        target_modules: PEFT-style targets; None = the family default.
        r: rank of each task's LoRA (RR lowers it for later tasks).
        lora_alpha: scaling numerator of the training-time LoRA (``s = lora_alpha / r``).
        rr: enable rank reduction (SD-LoRA-RR).
        kd: enable least-squares folding of redundant directions (SD-LoRA-KD).
        kd_threshold: ``τ`` on the relative squared residual.
        lr: learning rate of the LoRA factors and magnitudes; None = the run's ``lr``.
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16.0
    rr: bool = False
    kd: bool = False
    kd_threshold: float = 9e-4
    lr: float | None = None

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be ≥ 1, got {self.r}")

    def rank_for(self, task_index: int) -> int:
        """Rank of 0-based task ``task_index`` (RR schedule, else ``r``)."""
        if not self.rr or task_index < 4:
            return self.r
        return max(1, round(self.r * (0.8 if task_index < 8 else 0.6)))

    def to_dict(self) -> dict:
        return asdict(self)


def gram_of_directions(layers: list[SDLoRALinear], extra: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Gram matrix ``G[i, j] = Σ_layers ⟨B_i A_i, B_j A_j⟩_F`` float64 of the stored directions
    (plus one ``extra`` direction given per layer as ``(B, A)``), ``(K, K)``."""
    K = len(layers[0].ranks) + (1 if extra else 0)
    G = torch.zeros(K, K, dtype=torch.float64)  # (K, K) on the CPU; the traces come from the factors' device
    for li, layer in enumerate(layers):
        fac = [tuple(f.double() for f in layer.direction(k)) for k in range(len(layer.ranks))]
        if extra:
            fac.append(tuple(f.double() for f in extra[li]))
        for i in range(K):
            for j in range(i, K):
                v = torch.trace((fac[i][0].T @ fac[j][0]) @ (fac[j][1] @ fac[i][1].T)).cpu()
                G[i, j] += v
                if i != j:
                    G[j, i] += v
    return G


@register
class SDLoRAMethod(ContinualMethod):
    """SD-LoRA on any transformers encoder (task- and class-incremental).

    Attributes:
        layers: ``{module name: SDLoRALinear}``.
        magnitudes: ``α`` per stored direction (then the current task's), 0-dim parameters.
        folded: per task, ``None`` or the KD fit ``{"residual", "beta"}`` if its direction was dropped.
    """

    name = "sd-lora"
    label = "SD-LoRA"
    all_order: ClassVar[int | None] = 2
    config_class = SDLoRAConfig
    scenarios = ("til", "cil")
    official_optimizer = "sgd"
    storable = True
    task_independent_backbone = True  # every direction with its current magnitude, whatever the task
    _variant: dict = {}

    def __init__(self, encoder: Backbone, seed: int = 0, config: SDLoRAConfig | None = None, **overrides):
        super().__init__(encoder, seed)
        self.config = self.make_config(config, overrides, targets_from=encoder.model)  # a copy, with the variant's preset
        s = self.config.lora_alpha / self.config.r
        self.layers: dict[str, SDLoRALinear] = wrap_targets(encoder.model, self.config.target_modules, lambda lin: SDLoRALinear(lin, s, self.router))
        self.magnitudes: list[nn.Parameter] = []
        for layer in self.layers.values():
            layer.magnitudes = self.magnitudes  # one list, shared by every layer
        self.folded: list[dict | None] = []
        self._trainable = 0

    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        head = self._add_task(task)
        gen = self.generator(5)
        r = self.config.rank_for(len(self.task_names) - 1)
        factors = [p for layer in self.layers.values() for p in layer.begin_task(r, gen)]
        self.magnitudes.append(nn.Parameter(torch.tensor(1.0, device=self.encoder.device)))
        for a in self.magnitudes:
            a.requires_grad_(True)
        self._trainable = sum(p.numel() for p in factors) + len(self.magnitudes)
        lr = self.config.lr or cfg.lr
        return [{"params": factors + list(self.magnitudes), "lr": lr}, *self._head_groups(head, cfg)]

    @torch.no_grad()
    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        layers = list(self.layers.values())
        alpha_t = self.magnitudes[-1]
        norms = [layer.current_norm() for layer in layers]
        alpha_t.data = alpha_t.data * (sum(norms) / len(norms))  # least-squares fit of the trained update
        for layer in layers:
            layer.freeze_current()
        for a in self.magnitudes:
            a.requires_grad_(False)
        info: dict[str, Any] = {"magnitude": float(alpha_t), "update_norm_mean": sum(norms) / len(norms), "rank": layers[0].ranks[-1]}
        fit = self._kd_fold() if self.config.kd and len(layers[0].ranks) > 1 else None
        self.folded.append(fit)
        if fit is not None:
            info["kd"] = fit
        info["magnitudes"] = [float(a) for a in self.magnitudes]
        return info

    def _kd_fold(self) -> dict | None:
        """SD-LoRA-KD: fold the newest direction into the older ones if they explain it."""
        layers = list(self.layers.values())
        G = gram_of_directions(layers)
        old, b, vv = G[:-1, :-1], G[:-1, -1], G[-1, -1]
        if vv <= 0:
            return None
        beta = torch.linalg.lstsq(old, b.unsqueeze(1), driver="gelsd").solution[:, 0]
        residual = float((vv - 2 * beta @ b + beta @ old @ beta) / vv)
        fit = {"residual": residual, "beta": beta.tolist(), "dropped": residual <= self.config.kd_threshold}
        if fit["dropped"]:
            alpha_t = self.magnitudes.pop()
            for k, a in enumerate(self.magnitudes):
                a.data = a.data + alpha_t.data * beta[k].to(a.dtype)
            for layer in layers:
                layer.drop_last_direction()
        return fit

    # -------------------------------------------------------------- accounting
    def adapter_numbers_per_task(self) -> float:
        stored = sum(sum(layer.ranks) * (layer.in_features + layer.out_features) for layer in self.layers.values())
        return (stored + len(self.magnitudes)) / max(len(self.task_names), 1)

    def trainable_numbers_last_task(self) -> int:
        return self._trainable

    # -------------------------------------------------------------------- store
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Unit directions (``A_old``, ``B_old`` per layer), the magnitudes, the heads."""
        out = self.head_tensors()
        out["magnitudes"] = torch.stack([a.detach() for a in self.magnitudes]) if self.magnitudes else torch.zeros(0)
        for n, layer in self.layers.items():
            out[f"layers.{n}.A_old"], out[f"layers.{n}.B_old"] = layer.A_old.contiguous(), layer.B_old.contiguous()
        return out

    def state_meta(self) -> dict:
        return {"ranks": next(iter(self.layers.values())).ranks, "kd_fits": self.folded}

    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        mags = tensors["magnitudes"]
        self.magnitudes.clear()  # the layers share this list object
        self.magnitudes.extend(nn.Parameter(a.clone(), requires_grad=False) for a in mags)
        for n, layer in self.layers.items():
            layer.A_old, layer.B_old = tensors[f"layers.{n}.A_old"], tensors[f"layers.{n}.B_old"]
            layer.ranks = list(meta["ranks"])
            if sum(layer.ranks) != layer.A_old.shape[0] or len(layer.ranks) != len(mags):
                raise ValueError(f"layer {n}: ranks {layer.ranks} do not match {layer.A_old.shape[0]} rows and {len(mags)} magnitudes")
        self.folded = list(meta.get("kd_fits", []))
        self.load_tasks_and_heads(tensors, tasks)

    def report(self) -> dict:
        return {"magnitudes": [float(a) for a in self.magnitudes], "kd_fits": self.folded}


@register
class SDLoRARRMethod(SDLoRAMethod):
    """SD-LoRA-RR: SD-LoRA with the rank-reduction schedule."""

    name = "sd-lora-rr"
    label = "SD-LoRA-RR"
    all_order: ClassVar[int | None] = None
    _variant = {"rr": True}


@register
class SDLoRAKDMethod(SDLoRAMethod):
    """SD-LoRA-KD: SD-LoRA with least-squares folding of redundant directions."""

    name = "sd-lora-kd"
    label = "SD-LoRA-KD"
    all_order: ClassVar[int | None] = None
    _variant = {"kd": True}
