"""Share: one shared LoRA subspace per layer, a few hundred numbers per task.

Kaushik, Vaidya, Chaudhari, Chellappa, Yuille, "Shared LoRA Subspaces for almost Strict
Continual Learning", arXiv 2602.06043 (2026). Follows METHODS.md §1: bases initialised
from the first task's rank-r LoRA (or from PEFT adapters, data-free), frozen while a task
trains its coefficients plus φ temporary directions, then a data-free merge that
re-projects *every* task (not only the previous one, as the authors' code does), in the
small space, with balanced factors, no centring by default and no null-space padding.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from sharecl.adapters.share import INITS, PHI_INITS, ShareLinear
from sharecl.backbone import Backbone, TaskHeads
from sharecl.coeff_log import CoefficientLog
from sharecl.data.tasks import Task, check_task_name
from sharecl.inject import default_targets, set_submodule, wrap_targets
from sharecl.methods.registry import register
from sharecl.methods.share_cil import CIL_SCORES, MAHALANOBIS_SHRINK, ShareClassIncremental  # noqa: F401 (re-exported)
from sharecl.subspace import merge_subspace
from sharecl.train import PeakRSS, TrainConfig, train_steps

__all__ = ["ShareConfig", "ShareMethod", "SHARE_DEFAULTS", "LOG_STEPS_MAX", "DRIFT_ENTRIES_MAX"]

#: Share's settings per backbone family, for the :class:`ShareConfig` fields left None.
#: ``encoder`` (text encoders, ViTs): the settings every encoder table was measured with.
#: ``lm`` (causal LMs): the best setting within 2 % of a rank-8 q/v LoRA's bytes per task on gen5's
#: validation split (issue 30; ``benchmarks/bench_share_lm.py``, trial ``r10-all-linear``; docs
#: "Share on a causal LM"): every linear layer but the head (PEFT's ``"all-linear"``), k 10, p 2.
SHARE_DEFAULTS: dict[str, dict] = {
    "encoder": {"k": 10, "p": 2, "phi": 2, "coeff_lr_ratio": 1.0},
    "lm": {"k": 10, "p": 2, "phi": 2, "coeff_lr_ratio": 10.0, "target_modules": "all-linear"},
}

#: Merges kept in the coefficient logs before they are folded into a checkpoint
#: (:mod:`sharecl.coeff_log`): bounds the work of materialising coefficients after a merge.
LOG_STEPS_MAX = 256
UNBOUNDED_K = 1 << 30  # a merge that keeps every direction (numerical rank caps it): a batch's members before its last
DRIFT_ENTRIES_MAX = 100_000  # per-task drift entries kept in memory before older merges keep only their summary




@dataclass
class ShareConfig:
    """Share's hyper-parameters (names follow PEFT and METHODS.md §1).

    Attributes:
    Fields marked "family default" may be left None: the method fills them from
    :data:`SHARE_DEFAULTS` for its backbone's family (``"lm"`` for a causal LM, ``"encoder"`` for
    text encoders and ViTs) in a copy of the config (:meth:`resolved`); the config passed in is
    never changed.

    Attributes:
        target_modules: PEFT-style targets, or ``"all-linear"``; None = the family default
            (:data:`SHARE_DEFAULTS`, else the model type's query/value: :func:`~sharecl.inject.default_targets`).
        r: rank of the LoRA trained on the first task to seed the subspace.
        lora_alpha: ``s = lora_alpha / r`` scales every task's ``ΔW``.
        p: pseudo-rank: columns of each task's coefficients ``(k, p)``; None = family default.
        k: fixed basis size per side; None = the family default, unless ``energy`` is given.
        energy: keep the smallest k reaching this fraction of the stack's squared norm (k=None).
        k_max: cap on k under the energy rule.
        phi: temporary directions per side while a task trains (``φ``); None = family default.
        init: "zero" (ΔW = 0 at step 0), "previous" (warm start from the last task) or "top" (ΔW = 0,
            ``A_t`` starting as the basis's top-p input directions); :data:`sharecl.adapters.share.INITS`.
        phi_init: how the temporary directions start: "complement" [ours] (random orthonormal,
            outside the basis), "top" (the paper: the top-φ basis directions) or "uniform" (the
            authors' code: U(−0.5, 0.5) entries); :data:`sharecl.adapters.share.PHI_INITS`.
        merge_finetune_steps: steps fine-tuning the new task's coefficients on the merged basis.
        lr: learning rate of the seed task's LoRA, and the unit the ratios below multiply
            (None = TrainConfig.lr).
        coeff_lr_ratio: the coefficients' learning rate (``C_B``, ``C_A``, ``E_B``, ``E_A``, and the
            merge's fine-tuning) ÷ ``lr`` (as LoRA+'s ``loraplus_lr_ratio`` sets B's against A's).
            [ours] Adam moves every parameter by about its rate a step, so ``k·p`` coefficients on an
            orthonormal basis move ``ΔW`` ``√(d·r / (k·p))`` times less per step than a LoRA's
            ``d·r`` factor entries: a ratio above 1 gives the coefficients a LoRA's pace.
            None = family default.
        phi_lr_ratio: the temporary directions' learning rate (``U⁺``, ``V⁺``) ÷ ``lr``; None =
            family default (1 when the family gives none).
        cil_score: class-incremental task-identification score (see :meth:`ShareMethod.cil_logits`):
            "prototype" (default), "energy", "max-prob", "max-logit", "mahalanobis" (which also
            keeps each task's class means and covariances: ``C · hidden · (hidden + 1)`` numbers)
            or "aligned" (set by ``--align``: a task-identification head on the base model's
            features, aligned on class statistics of those features; same numbers plus the head).
        center: build the basis from mean-centred stacks, as the authors' code does (for
            comparison only: the uncentred basis is the best rank-k fit; METHODS.md §1).
        cil_top_tasks: with ``cil_score="aligned"`` only: run each input under its ``m`` most
            likely tasks (by the aligned identification on base features) instead of under every
            task, so class-incremental inference costs ``1 + m`` forwards whatever the task
            count; None (default) runs every task. [ours]
    """

    target_modules: list[str] | str | None = None
    r: int = 8
    lora_alpha: float = 16.0
    p: int | None = None
    k: int | None = None
    energy: float | None = None
    k_max: int | None = None
    phi: int | None = None
    init: str = "zero"
    phi_init: str = "complement"
    merge_finetune_steps: int = 0
    lr: float | None = None
    coeff_lr_ratio: float | None = None
    phi_lr_ratio: float | None = None
    cil_score: str = "prototype"
    center: bool = False
    cil_top_tasks: int | None = None

    def __post_init__(self):
        if self.cil_top_tasks is not None and (not isinstance(self.cil_top_tasks, int) or self.cil_top_tasks < 1):
            raise ValueError(f"ShareConfig.cil_top_tasks must be a positive integer or None, got {self.cil_top_tasks!r}")
        if self.cil_score not in CIL_SCORES:
            raise ValueError(f"ShareConfig.cil_score must be one of {CIL_SCORES}, got {self.cil_score!r}")
        if self.k is not None and self.energy is not None:
            raise ValueError("ShareConfig: give k or energy, not both (leave k=None to use the energy rule)")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise ValueError(f"ShareConfig.energy must be a fraction in (0, 1], got {self.energy!r}")
        for name in ("r", "p", "k", "phi"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < (0 if name == "phi" else 1)):
                raise ValueError(f"ShareConfig.{name} must be a {'non-negative' if name == 'phi' else 'positive'} integer, got {v!r}")
        if self.p is not None and self.p > self.r:
            raise ValueError(f"ShareConfig: pseudo-rank p={self.p} cannot exceed the seed rank r={self.r}")
        if self.init not in INITS:
            raise ValueError(f"ShareConfig.init must be one of {INITS}, got {self.init!r}")
        if self.phi_init not in PHI_INITS:
            raise ValueError(f"ShareConfig.phi_init must be one of {PHI_INITS}, got {self.phi_init!r}")
        for name in ("coeff_lr_ratio", "phi_lr_ratio"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"ShareConfig.{name} must be positive, got {getattr(self, name)!r}")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    def resolved(self, family: str) -> ShareConfig:
        """A copy with every field left None that has a family default filled from
        :data:`SHARE_DEFAULTS` ``[family]`` (``k`` only without ``energy``); ``self`` is unchanged.

        Raises:
            KeyError: for an unknown family; ValueError: if the filled values contradict the
                given ones (a default p above a given r).
        """
        if family not in SHARE_DEFAULTS:
            raise KeyError(f"unknown backbone family {family!r}; known: {sorted(SHARE_DEFAULTS)}")
        fill = {k: v for k, v in {"phi_lr_ratio": 1.0, **SHARE_DEFAULTS[family]}.items() if getattr(self, k) is None}
        if self.energy is not None:
            fill.pop("k", None)
        if "p" in fill:
            fill["p"] = min(fill["p"], self.r)  # a smaller seed rank caps the default pseudo-rank
        return replace(self, **copy.deepcopy(fill))

    def to_dict(self) -> dict:
        return asdict(self)


@register
class ShareMethod(ShareClassIncremental):
    """Share on any transformers encoder: coefficients chosen by task id (TIL), or by the most
    confident task in one mixed-task forward (CIL, :meth:`cil_logits`).

    Attributes:
        layers: ``{module name: ShareLinear}`` in model order.
        drift: per merge, ``{"after_task", "per_task": {name: {"mean", "max"}}, "new_task": {...}}``
            (relative Frobenius change of each old task's ΔW, over layers; for the new task, its
            own rank-r → p truncation ``‖ΔW_t − ΔW_t^(p)‖/‖ΔW_t‖`` and its projection's change).
            Once the records hold more than :data:`DRIFT_ENTRIES_MAX` per-task entries (they grow
            as T²/2), every merge but the last keeps only its summary (``drift_mean``,
            ``drift_max``, ``worst_task``; :func:`sharecl.merges.compact_merges`), as stores do.
        kinds: ``{task: "data" | "adapter"}``.
    """

    name = "share"
    label = "Share"
    all_order: ClassVar[int | None] = 0
    folds_adapters = True
    exports_peft = True
    config_class = ShareConfig
    scenarios = ("til", "cil")
    aligns = True  # on the base model's features, for task identification (ShareClassIncremental.align_classifier)
    storable = True

    def __init__(self, encoder: Backbone, seed: int = 0, config: ShareConfig | None = None, **overrides):
        super().__init__(encoder, seed)
        given = self.make_config(config, overrides)  # a copy: the caller's stays as given
        self.config = given.resolved("lm" if self.modality == "lm" else "encoder")
        if self.config.target_modules is None:
            self.config.target_modules = default_targets(encoder.model)
        targets = self.config.target_modules
        cfg = self.config
        self.layers: dict[str, ShareLinear] = wrap_targets(
            encoder.model, targets, lambda lin: ShareLinear(lin, scaling=cfg.scaling, p=cfg.p, router=self.router))
        self.drift: list[dict] = []
        self._drift_entries = 0  # per-task entries in self.drift
        self.kinds: dict[str, str] = {}
        self.prototypes: dict[str, torch.Tensor] = {}  # task → class-mean features (C, hidden) under its own ΔW
        self.taskid_heads = TaskHeads(encoder.hidden_size, encoder.device)  # --align: task identification on base features
        self._last_trainable = 0

    # ----------------------------------------------------------------- routing
    def routed(self, task_name: str, training: bool = False):
        """Training: the layers' trainable state (no route); inference: the task's coefficients."""
        if training:
            self.check_task(task_name)
            return self.router.nowhere()
        return self.router.use(task_index=self.index(task_name), row_tasks=None)

    def index(self, task_name: str) -> int:
        self.check_task(task_name)
        return self.task_names.index(task_name)

    # ---------------------------------------------------------------- training
    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        if cfg.align and self.config.cil_score == "mahalanobis":
            raise ValueError("--align and cil_score='mahalanobis' both keep class statistics, on different features; "
                             "choose one (--align sets cil_score='aligned')")
        gen = self.generator(3)
        head = self._add_task(task)  # first: a duplicate name must fail before any layer changes
        states = [layer.begin_task(seed_rank=self.config.r, phi=self.config.phi, init=self.config.init, generator=gen,
                                   phi_init=self.config.phi_init) for layer in self.layers.values()]
        self.kinds[task.name] = "data"
        directions = [p for s in states for p in s.directions()]
        coefficients = [p for s in states for p in s.coefficients()]
        self._last_trainable = sum(p.numel() for p in directions + coefficients)
        seed = states[0].kind == "seed"  # the seed task trains a plain LoRA at lr; later tasks their ratios
        groups = [{"params": directions, "lr": self._lr(cfg) * (1.0 if seed else self.config.phi_lr_ratio)},
                  {"params": coefficients, "lr": self._lr(cfg, coefficients=True)}]
        return [g for g in groups if g["params"]] + self._head_groups(head, cfg)

    def _lr(self, cfg: TrainConfig, coefficients: bool = False) -> float:
        """``config.lr`` (else the run's), × ``coeff_lr_ratio`` for coefficients."""
        lr = self.config.lr or cfg.lr
        if lr is None:
            raise ValueError("no learning rate: give ShareConfig.lr or TrainConfig.lr (ContinualMethod.learn resolves the run's)")
        return lr * self.config.coeff_lr_ratio if coefficients else lr

    def _merge_new(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], task_name: str,
                   truncate: bool = True) -> dict:
        """Merge one new task's factors ``{layer: (B, A)}`` into every layer; record drift.
        ``truncate=False``: keep every direction (a batch's members before its last)."""
        old = list(self.task_names[:-1])
        energies, cuts, own, drifts = [], [], [], []
        cfg = self.config
        for name, layer in self.layers.items():
            B, A = factors[name]
            has = layer.num_tasks > 0
            res = merge_subspace(layer.U if has else None, layer.V if has else None,
                                 layer.log_B if has else None, layer.log_A if has else None,
                                 B, A, p=cfg.p, k=cfg.k if truncate else UNBOUNDED_K, energy=cfg.energy if truncate else None,
                                 k_max=cfg.k_max if truncate else None,
                                 grams=layer.merge_grams() if has else None, reproject=False, center=cfg.center)
            layer.apply_merge(res)
            energies.append((res.energy_B, res.energy_A))
            cuts.append(res.truncation)
            own.append(float(res.drift[-1]))
            drifts.append(res.drift[:-1])
        by_layer = torch.stack(drifts)  # (layers, old tasks)
        means, maxes = by_layer.mean(0).tolist(), by_layer.amax(0).tolist()
        record = {"after_task": task_name,
                  "per_task": {n: {"mean": a, "max": b} for n, a, b in zip(old, means, maxes)},
                  # the new task itself: rank r → p (its own cut), then its rank-p part in the new basis
                  "new_task": {"truncation_mean": sum(cuts) / len(cuts), "truncation_max": max(cuts),
                               "projection_max": max(own)},
                  "k": [list(layer.k) for layer in self.layers.values()],
                  "kept_energy_min": min(min(e) for e in energies)}
        self.drift.append(record)
        self._drift_entries += len(old)
        if self._drift_entries > DRIFT_ENTRIES_MAX:  # a long stream: O(T) memory per merge, not O(T²) over the stream
            from sharecl.merges import compact_merges

            self.drift, self._drift_entries = compact_merges(self.drift), len(old)
        if self.log_steps() > LOG_STEPS_MAX:
            self.compact_log()
        return record

    def aligns_every_task(self) -> bool:
        """A model whose task identification is aligned (``cil_score="aligned"``, from
        ``--align``); Share's ``"mahalanobis"`` score keeps class statistics without aligning."""
        return self.config.cil_score == "aligned"

    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        factors = {name: layer.trained_factors() for name, layer in self.layers.items()}
        record = self._merge_new(factors, task.name)
        if self.config.merge_finetune_steps > 0:
            self.finetune_coefficients(task, cfg, self.config.merge_finetune_steps, rss=rss, progress=progress)
        if task.name in self.heads:  # class prototypes identify the task in class-incremental inference
            self.prototypes[task.name] = self.class_prototypes(task, cfg.eval_batch_size)
            if self.config.cil_score == "mahalanobis":
                self.class_stats[task.name] = self.task_class_statistics(task, cfg.eval_batch_size)
        return {"merge": record}

    def finetune_coefficients(self, task: Task, cfg: TrainConfig, steps: int, *, head: bool = True, salt: int = 13,
                              rss: PeakRSS | None = None, progress: bool = True) -> list[float]:
        """Train ``task``'s coefficients (and its head, with ``head``) for ``steps`` steps on its
        data, the merged bases frozen (METHODS.md §1, "merging & finetuning"). Returns the losses."""
        idx = self.index(task.name)
        states = [layer.begin_finetune(idx) for layer in self.layers.values()]
        params = [p for s in states for p in s.parameters()]
        task_head = self.heads.heads[task.name] if head and task.name in self.heads else None
        try:
            return train_steps(self.training_forward(task),
                               [{"params": params, "lr": self._lr(cfg, coefficients=True)}, *self._head_groups(task_head, cfg)],
                               task, cfg, steps=steps, desc=f"{self.name} · {task.name} · finetune",
                               generator=self.generator(salt), rss=rss, progress=progress)
        finally:
            for layer in self.layers.values():
                layer.end_finetune()

    # ------------------------------------------------------ adapter-only tasks
    def add_adapter(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
                    classes: list[str] | None = None) -> dict:
        """Fold a trained LoRA into the subspace without data (Share's "asynchronous" tasks).

        Args:
            name: new task name.
            factors: ``{layer name: (lora_B (d_out, r), lora_A (r, d_in))}`` for any non-empty
                subset of this model's adapted layers (a layer left out gets no update: zero
                factors); names may carry a prefix (``base_model.model.``, a task model's).
            scaling: the adapter's own ``lora_alpha / r``; B is rescaled to this model's ``s``.
            classes: class names, if a head will be attached later; stored for reference.

        Returns:
            The merge record (drift per old task, the new task's own truncation) with
            ``layers_without_update``: how many adapted layers the adapter did not cover.

        Raises:
            ValueError: on a name clash, layers this model does not adapt, no layer in common,
                or shape mismatches.
        """
        return self.add_adapters([(name, factors, scaling)], classes=[classes or []])[0]

    def add_adapters(self, adapters: list[tuple[str, dict[str, tuple[torch.Tensor, torch.Tensor]], float]],
                     classes: list[list[str]] | None = None) -> list[dict]:
        """Fold a batch of trained LoRAs at once, with **one** truncation of the basis (the paper's
        batch arrival, Lots-of-LoRAs: adapters come in groups, not one by one).

        Every adapter is checked before anything changes. The batch's members are merged in turn
        with no truncation (the basis keeps every stored direction, so each member's rank-p
        coefficients stay exact), and the last one with the configured rank rule (``k`` or
        ``energy``): the basis is then the top-k of the stack of every task's stored factors and
        the last member's full factors, one truncation for the whole batch, as a joint SVD of the
        batch would give [ours: the paper states the batch protocol, not its merge order]. A batch
        of one is :meth:`add_adapter`. Intermediate bases are ``k + Σ r`` wide per side.

        Args:
            adapters: ``[(name, factors, scaling), …]`` as :meth:`add_adapter` takes them.
            classes: per adapter, class names (optional).

        Returns:
            One merge record per adapter (the truncation's drift is in the last one's).

        Raises:
            ValueError: as :meth:`add_adapter`, for any member, or a name repeated in the batch.
        """
        from sharecl.methods.share_adapters import check_adapter_factors

        names = [a[0] for a in adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"the batch names a task twice: {sorted(n for n in set(names) if names.count(n) > 1)}")
        if not adapters:
            return []
        for n in names:
            check_task_name(n)
            if n in self.task_classes:
                raise ValueError(f"task {n!r} already exists; choose another name")
        prepared = [check_adapter_factors(self, f, s) for _, f, s in adapters]
        records = []
        for i, ((name, _, _), (scaled, missing)) in enumerate(zip(adapters, prepared)):
            self.task_names.append(name)
            self.task_classes[name] = list((classes or [[]] * len(adapters))[i] or [])
            self.kinds[name] = "adapter"
            last = i == len(adapters) - 1
            records.append({**self._merge_new(scaled, name, truncate=last), "layers_without_update": missing})
        return records

    def task_origin(self, task_name: str) -> str:
        return self.kinds.get(task_name, "data")

    # --------------------------------------------------------------- inference
    def mixed_route(self, task_names: list[str]):
        """Every row gathers its own task's ``M_t = C_B[t] C_A[t]ᵀ`` in each adapted layer
        (METHODS.md §1, "Inference"): one forward, the cost of one rank-k adapter.

        Raises:
            KeyError: for an unknown task.
        """
        rows = torch.tensor([self.index(t) for t in task_names], dtype=torch.long, device=self.encoder.device)
        return self.router.use(task_index=None, row_tasks=rows)

    def folded_model(self, task_name: str) -> nn.Module:
        """A copy of the backbone with task ``task_name``'s ΔW folded into plain ``nn.Linear`` weights."""
        idx = self.index(task_name)
        model = copy.deepcopy(self.encoder.model)
        for name in self.layers:
            set_submodule(model, name, model.get_submodule(name).folded_linear(idx))
        return model

    # -------------------------------------------------------------- accounting
    def adapter_numbers_per_task(self) -> float:
        return float(sum((layer.k[0] + layer.k[1]) * layer.p for layer in self.layers.values()))

    def head_numbers_per_task(self) -> float:
        extra = sum(v.numel() for v in self.prototypes.values()) + sum(v.numel() for v in self.taskid_tensors().values())
        return super().head_numbers_per_task() + extra / max(len(self.task_names), 1)

    def report(self) -> dict:
        return {"merges": self.drift}

    def restore_report(self, report: dict) -> None:
        """The merges with every task's drift (a store keeps the last merge's, and summaries of the others)."""
        self.drift = list(report.get("merges", self.drift))
        self._drift_entries = sum(len(r.get("per_task") or {}) for r in self.drift)

    def shared_numbers(self) -> int:
        return sum(layer.U.numel() + layer.V.numel() for layer in self.layers.values())

    def trainable_numbers_last_task(self) -> int:
        return self._last_trainable

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """A checkpoint: bases, every task's current coefficients, heads and prototypes. Folds
        the coefficient logs first (:meth:`compact_log`) when they hold merges."""
        if self.log_steps():
            self.compact_log()
        out = {**self.head_tensors(), **self.taskid_tensors()}
        out.update({f"prototypes.{t}": v.contiguous() for t, v in self.prototypes.items()})
        for name, layer in self.layers.items():
            out[f"layers.{name}.U"], out[f"layers.{name}.V"] = layer.U.detach(), layer.V.detach()
            out[f"layers.{name}.coeff_B"], out[f"layers.{name}.coeff_A"] = layer.log_B.base, layer.log_A.base
        return {k: v.contiguous() for k, v in out.items()}

    def state_meta(self) -> dict:
        return {"kinds": dict(self.kinds)}

    # ------------------------------------------------------------ store log
    def log_steps(self) -> int:
        """Merges in the coefficient logs since their checkpoint (the same in every layer)."""
        return len(next(iter(self.layers.values())).log_B.steps)

    @property
    def log_epoch(self) -> int:
        """Changes whenever any layer's coefficient log is folded into a new checkpoint."""
        return sum(layer.log_B.epoch + layer.log_A.epoch for layer in self.layers.values())

    def compact_log(self) -> None:
        """Fold every layer's coefficient log into its checkpoint; the coefficients stay bitwise
        the same, and the next store write is a checkpoint (:func:`sharecl.store.save_store`)."""
        for layer in self.layers.values():
            layer.log_B.compact(layer.coeff_B.dtype)
            layer.log_A.compact(layer.coeff_A.dtype)

    def log_tensors(self, start: int) -> tuple[dict[str, torch.Tensor], list[str]]:
        """What a store appends for the merges ``start …`` of the logs: the current bases, each
        merge's changes of basis (float64) and new coefficients, the new tasks' heads, class
        statistics and prototypes, and every task-identification head (``--align``). Returns
        ``(tensors, new task names)``; keys never clash with a checkpoint's coefficients, so
        a store's files are read back as one dict (:meth:`load_state`)."""
        steps = self.log_steps()
        new = self.task_names[len(self.task_names) - (steps - start):]
        out = {k: v for k, v in self.head_tensors().items() if k.split(".")[1] in new}
        out.update(self.taskid_tensors())  # every task's: each alignment re-trains them all
        out.update({f"prototypes.{t}": self.prototypes[t].contiguous() for t in new if t in self.prototypes})
        for name, layer in self.layers.items():
            out[f"layers.{name}.U"], out[f"layers.{name}.V"] = layer.U.detach(), layer.V.detach()
            for g in range(start, steps):
                for side, log in (("B", layer.log_B), ("A", layer.log_A)):
                    change, coeff = log.steps[g]
                    out[f"steps.{g}.layers.{name}.change_{side}"] = change
                    out[f"steps.{g}.layers.{name}.coeff_{side}"] = coeff
        return {k: v.detach().contiguous() for k, v in out.items()}, new

    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        """Inverse of :meth:`state_tensors` (plus any :meth:`log_tensors` read back into the same
        dict), given the task list in order. The logs are rebuilt as written, so the coefficients
        are bitwise those of the process that wrote them."""
        for name, layer in self.layers.items():
            dt = layer.base.weight.dtype
            logs = [CoefficientLog(tensors[f"layers.{name}.coeff_{side}"].to(dt)) for side in ("B", "A")]
            g = 0
            while f"steps.{g}.layers.{name}.change_B" in tensors:
                for side, log in zip(("B", "A"), logs):
                    log.append(tensors[f"steps.{g}.layers.{name}.change_{side}"], tensors[f"steps.{g}.layers.{name}.coeff_{side}"])
                g += 1
            layer.load_logs(tensors[f"layers.{name}.U"], tensors[f"layers.{name}.V"], *logs)
        self.load_tasks_and_heads(tensors, tasks)
        self.load_taskid(tensors, tasks)
        self.prototypes = {t["name"]: tensors[f"prototypes.{t['name']}"] for t in tasks if f"prototypes.{t['name']}" in tensors}
        self.kinds = {t["name"]: meta.get("kinds", {}).get(t["name"], t.get("kind", "data")) for t in tasks}
        self.drift = list(meta.get("merges", []))
        self._drift_entries = sum(len(r.get("per_task") or {}) for r in self.drift)
