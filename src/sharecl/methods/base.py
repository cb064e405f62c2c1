"""What every continual method provides (the registry of methods is :mod:`sharecl.methods.registry`).

A method wraps one backbone (an :class:`~sharecl.backbone.Encoder`, a
:class:`~sharecl.generation.lm.CausalLM`, or any HF model through :func:`sharecl.wrap`, :mod:`sharecl.wrapping`). For
each task the shared loop calls :meth:`ContinualMethod.begin_task` (returns parameter groups
to train), trains, then calls :meth:`ContinualMethod.end_task` (between-task work: merges,
memories). What a task *scores* is the task's business: a classification task gets a head
(kept in :attr:`ContinualMethod.heads`, trained through :meth:`ContinualMethod.logits`), a
generation task none (trained through :meth:`ContinualMethod.lm_loss`, evaluated by generating
under ``with method.task(name)``). Methods differ only in their adapters and in
:meth:`ContinualMethod.routed`: which adapter state a forward for one task uses.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from sharecl.backbone import Backbone, TaskHeads
from sharecl.data.tasks import Task
from sharecl.methods.mixed import MixedTaskInference
from sharecl.objectives import objective_of
from sharecl.routing import Router
from sharecl.train import PeakRSS, TrainConfig, train_steps

__all__ = ["ContinualMethod", "UnsupportedScenarioError"]


class UnsupportedScenarioError(ValueError):
    """A method was asked to run a scenario it does not support."""


class ContinualMethod(MixedTaskInference, ABC):
    """Base class: one backbone, per-task heads, a task list.

    Class attributes:
        name: registry name (``share``, ``lora-per-task``, …; :func:`~sharecl.methods.registry.register`).
        scenarios: supported scenarios, a subset of ``("til", "cil")``.
        storable: whether :mod:`sharecl.store` can save this method.
        resumable: whether a stopped run can continue after its last finished task
            (:mod:`sharecl.resume`): every storable method, and methods with the state hooks
            (:meth:`state_tensors`, :meth:`load_state`) but no store format (the LoRA baselines).
    """

    name: ClassVar[str]
    scenarios: ClassVar[tuple[str, ...]] = ("til",)
    #: whether ``--align`` (classifier alignment, :meth:`align_classifier`) applies: one feature space for all tasks.
    aligns: ClassVar[bool] = True
    #: the optimiser the method's official code trains with, when it is not AdamW (``compare --tune-lr`` tries both)
    official_optimizer: ClassVar[str | None] = None
    #: whether the method trains anything (a learning rate matters; ``compare --tune-lr`` tunes it)
    trains: ClassVar[bool] = True
    storable: ClassVar[bool] = False
    resumable: ClassVar[bool] = False
    #: the backbone computes the same features whatever the task (InfLoRA, SD-LoRA after merging):
    #: a batch mixing tasks needs one forward and per-row heads.
    task_independent_backbone: ClassVar[bool] = False
    #: learning a task changes nothing an earlier task's task-incremental score reads (its own adapter
    #: and head are frozen once learned): the runner scores each task once, when it is learned, and
    #: carries that score down the accuracy matrix instead of re-evaluating it after every later task.
    isolated_tasks: ClassVar[bool] = False
    #: the dataclass holding the method's options (``self.config``)
    config_class: ClassVar[type | None] = None
    #: the kinds of task the method learns: ``classification`` (a head) and/or ``generation`` (a causal LM)
    task_kinds: ClassVar[tuple[str, ...]] = ("classification", "generation")
    config: Any  #: the method's options, an instance of :attr:`config_class` (set by ``__init__``)
    #: how tables and plots name the method (default: its registered name)
    label: ClassVar[str] = ""
    #: its place in ``sharecl compare --methods all`` (None: run only when named)
    all_order: ClassVar[int | None] = None
    #: folds a trained LoRA adapter into its state without data (``sharecl add-adapter``)
    folds_adapters: ClassVar[bool] = False
    #: writes a task as a plain PEFT LoRA directory (``sharecl export``)
    exports_peft: ClassVar[bool] = False

    @classmethod
    def default_config(cls, **overrides) -> dict:
        """The options a method built with ``overrides`` gets, as a JSON-ready dict, before it
        sees a model (``None`` where the model decides, e.g. target modules).

        Raises:
            ValueError/TypeError: as the config class does for bad or unknown options.
        """
        if cls.config_class is None:
            return {}
        cfg = cls.config_class(**{**getattr(cls, "_variant", {}), **overrides})
        return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))

    @classmethod
    def make_config(cls, config=None, overrides: dict | None = None, *, targets_from: nn.Module | None = None):
        """The config a method runs with: a **copy** of ``config`` (default: the config class's
        defaults) with the class's variant preset (SD-LoRA-RR's ``rr``, -KD's ``kd``) and then
        ``overrides`` applied on top; ``target_modules=None`` becomes the model family's default
        when ``targets_from`` (the model) is given. The caller's config object is never changed.

        Raises:
            TypeError: for a config of another method's class; ValueError/TypeError: as the
                config class does for bad or unknown options.
        """
        if cls.config_class is None:
            return None
        if config is not None and not isinstance(config, cls.config_class):
            raise TypeError(f"method {cls.name!r} takes a {cls.config_class.__name__}, got a {type(config).__name__}")
        base: Any = copy.deepcopy(config) if config is not None else cls.config_class()
        cfg = dataclasses.replace(base, **{**getattr(cls, "_variant", {}), **(overrides or {})})
        if targets_from is not None and getattr(cfg, "target_modules", "") is None:
            from sharecl.inject import default_targets

            cfg.target_modules = default_targets(targets_from)
        return cfg

    def __init__(self, encoder: Backbone, seed: int = 0):
        self.encoder = encoder
        self.heads = TaskHeads(encoder.hidden_size, encoder.device)
        self.task_names: list[str] = []
        self.task_classes: dict[str, list[str]] = {}  # [] for a generation task
        self.seed = seed
        self.num_tasks: int | None = None
        self.layers: Mapping[str, nn.Module] = {}  # the adapted layers; each method narrows the type
        self.router = Router()  # handed to every layer the method wraps (sharecl.routing)
        self.class_stats: dict[str, tuple[torch.Tensor, ...]] = {}  # task → (means, covs) or (means, factors, diags), --align
        self._align_data: dict[str, Task] = {}  # only with TrainConfig.align_recompute (a measurement; keeps data)

    @property
    def modality(self) -> str:
        """``image`` for a vision backbone, ``lm`` for a causal LM, else ``text``."""
        return getattr(self.encoder, "modality", None) or ("image" if self.encoder.images is not None else "text")

    def begin_stream(self, num_tasks: int | None) -> None:
        """Told once before a stream of ``num_tasks`` tasks (None: open-ended, e.g. a store)."""
        self.num_tasks = num_tasks

    # -- the per-task protocol -------------------------------------------------
    def check_scenario(self, scenario: str) -> None:
        if scenario not in self.scenarios:
            raise UnsupportedScenarioError(
                f"method {self.name!r} supports {list(self.scenarios)}, not {scenario!r}; pick another method or stream")

    def generator(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded from the method seed, the task count and ``salt``."""
        return torch.Generator().manual_seed(self.seed * 100_003 + len(self.task_names) * 1_009 + salt)

    def _add_task(self, task: Task) -> nn.Linear | None:
        """Register ``task``; returns its new head, or None for a task without one (generation)."""
        if task.name in self.task_classes:
            raise ValueError(f"task {task.name!r} already exists; choose another name")
        classes = list(getattr(task, "classes", []))
        head = self.heads.add(task.name, task.num_classes, self.generator(7)) if classes else None
        self.task_names.append(task.name)
        self.task_classes[task.name] = classes
        return head

    @staticmethod
    def _head_groups(head: nn.Linear | None, cfg: TrainConfig) -> list[dict]:
        """The AdamW group of a task's head (none for a task without a head)."""
        return [] if head is None else [{"params": list(head.parameters()), "lr": cfg.head_lr}]

    @abstractmethod
    def begin_task(self, task: Task, cfg: TrainConfig) -> list[dict]:
        """Prepare to train ``task``; returns AdamW parameter groups (adapter, and head if any)."""

    @abstractmethod
    def end_task(self, task: Task, cfg: TrainConfig, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        """Between-task work after training ``task``; returns JSON-ready info."""

    # -- routing ---------------------------------------------------------------
    def routed(self, task_name: str, training: bool = False) -> contextlib.AbstractContextManager:
        """A context in which the wrapped model computes for ``task_name`` (``training``: for the
        task being learned, whose trainable state the layers hold). Default: nothing to route
        (every task shares the current weights: InfLoRA, SD-LoRA). Overridden by methods whose
        layers keep tasks apart (Share, DualLoRA, LoRA per task).

        Raises:
            KeyError: for an unknown task.
        """
        self.check_task(task_name)
        return contextlib.nullcontext()

    def task(self, task_name: str) -> contextlib.AbstractContextManager:
        """``with method.task(name): model.generate(...)``: inference for one learned task.

        Raises:
            KeyError: for an unknown task.
        """
        return self.routed(task_name, training=False)

    def logits(self, inputs: list, task_name: str, training: bool = False) -> torch.Tensor:
        """Logits ``(N, num_classes of task)`` for raw inputs under ``task_name``'s adapter and head.

        Raises:
            KeyError: for an unknown task; ValueError: for a task without a head (generation).
        """
        with self.routed(task_name, training):
            if task_name not in self.heads:
                raise ValueError(f"task {task_name!r} is a generation task and has no classification head")
            return self._encode_head(inputs, task_name, training)

    def lm_loss(self, examples: list, task_name: str, training: bool = False) -> torch.Tensor:
        """Mean token cross-entropy (0-dim float32) of the targets of ``(prompt, target)`` pairs,
        prompts and padding masked (METHODS.md §6), under ``task_name``'s adapter.

        Raises:
            KeyError: for an unknown task; TypeError: if the backbone is not a causal LM.
        """
        return self.lm_loss_terms(examples, task_name, training)[0]

    def lm_loss_terms(self, examples: list, task_name: str, training: bool = False, reduction: str = "mean"
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, tokens)``: :meth:`lm_loss` (or with ``reduction="sum"`` the sum over target
        tokens) and the number of target tokens it counts (0-dim float32)."""
        from sharecl.generation.lm import CausalLM

        if not isinstance(self.encoder, CausalLM):
            raise TypeError(f"lm_loss needs a causal LM backbone, this method wraps a {type(self.encoder).__name__}")
        with self.routed(task_name, training), torch.set_grad_enabled(training and torch.is_grad_enabled()):
            batch = self.encoder.tokenize(examples)
            tokens = (batch["labels"][:, 1:] != -100).sum().float()
            with self.router.use(token_mask=batch["attention_mask"].bool()):
                return self.encoder.loss(batch, reduction=reduction), tokens

    def training_forward(self, task: Task):
        """What :func:`sharecl.train.train_steps` calls on a batch of ``task``'s training inputs and
        labels: ``(loss, count)`` from the task's objective (:mod:`sharecl.objectives`)."""
        objective = objective_of(task)
        return lambda xs, ys, reduction="mean": objective.batch_loss(self, task, xs, ys, reduction)

    def learn(self, task: Task, cfg: TrainConfig, *, rss: PeakRSS | None = None, progress: bool = True) -> dict:
        """Train one task end to end (begin, train, end). Restores nothing on failure: callers
        that must keep old state (the store) work on a loaded copy. A ``cfg`` without a learning
        rate gets the modality's default (:meth:`TrainConfig.resolved`). A model built with
        classifier alignment (:meth:`aligns_every_task`) aligns every new task too, at the rank
        its statistics were kept at, so a store keeps answering without a task id whatever
        ``learn`` is called with."""
        cfg = cfg.resolved(self.modality)
        if not cfg.align and self.aligns_every_task():
            cfg = dataclasses.replace(cfg, align=True, align_rank=self.kept_align_rank())
        groups = self.begin_task(task, cfg)
        losses = train_steps(self.training_forward(task), groups, task, cfg,
                             desc=f"{self.name} · {task.name}", generator=self.generator(11), rss=rss, progress=progress)
        info = self.end_task(task, cfg, rss=rss, progress=progress)
        if cfg.align:
            info["align"] = self.align_classifier(task, cfg)
        return {"final_loss": losses[-1] if losses else None, **info}

    @staticmethod
    @torch.no_grad()
    def batched(features, inputs: list, batch_size: int) -> torch.Tensor:
        """``features`` (inputs → ``(n, hidden)``) over ``inputs`` in batches, concatenated on the CPU."""
        return torch.cat([features(inputs[i: i + batch_size]).cpu() for i in range(0, len(inputs), batch_size)])

    # -- classifier alignment (SLCA §3.3; sharecl.align) -------------------------
    @torch.no_grad()
    def cil_features(self, inputs: list) -> torch.Tensor:
        """Features ``(N, hidden)`` float32 that :meth:`cil_logits` feeds every head: one feature
        space for all tasks. Methods whose class-incremental scores read task-specific features
        raise ``ValueError`` (classifier alignment needs one space)."""
        return self._features(inputs)

    def feature_statistics(self, task: Task, cfg: TrainConfig) -> tuple[torch.Tensor, ...]:
        """Class statistics of :meth:`cil_features` over ``task``'s training inputs: ``(means,
        covs)`` (:func:`sharecl.align.class_statistics`) or, with ``cfg.align_rank``, ``(means,
        factors, diags)`` (:func:`sharecl.align.low_rank_statistics`)."""
        from sharecl.align import class_statistics, low_rank_statistics

        feats = self.batched(self.cil_features, task.train_inputs, cfg.eval_batch_size)
        stats = class_statistics(feats, torch.tensor(task.train_labels), task.num_classes)
        return low_rank_statistics(*stats, cfg.align_rank) if cfg.align_rank else stats

    def aligns_every_task(self) -> bool:
        """Whether this model was learned with classifier alignment (``--align``), so every new
        task must be aligned too: every task with a classification head has class statistics."""
        names = [t for t in self.task_names if t in self.heads]
        return bool(names) and all(t in self.class_stats for t in names)

    def kept_align_rank(self) -> int | None:
        """The ``align_rank`` the newest task's class statistics were kept at (None: full covariances)."""
        last = [t for t in self.task_names if t in self.class_stats]
        stats = self.class_stats[last[-1]] if last else ()
        return int(stats[1].shape[-1]) if len(stats) == 3 else None

    def align_classifier(self, task: Task, cfg: TrainConfig) -> dict:
        """Keep ``task``'s class statistics (mean and covariance of :meth:`cil_features` over its
        training inputs), then re-train every head on features sampled from every seen class's
        Gaussian (:func:`sharecl.align.align_heads`). Old tasks' statistics are kept as computed
        when they were learned.

        Returns:
            ``{"loss_before", "loss_after", "classes"}``.

        Raises:
            ValueError: for a method without one feature space, or a class with < 2 examples.
        """
        from sharecl.align import align_heads

        if cfg.align_recompute:  # measurement only: keeps every task's data (see TrainConfig)
            self._align_data[task.name] = task
        for t in self._align_data.values() if cfg.align_recompute else [task]:
            self.class_stats[t.name] = self.feature_statistics(t, cfg)
        names = [t for t in self.task_names if t in self.heads]
        missing = [t for t in names if t not in self.class_stats]
        if missing:
            raise ValueError(f"tasks {missing} have no class statistics (learned without --align); alignment needs every task's")
        info = align_heads([self.heads.heads[t] for t in names], [self.class_stats[t] for t in names], steps=cfg.align_steps,
                           per_class=cfg.align_samples, lr=cfg.align_lr, generator=self.generator(17))
        return {**info, "classes": sum(len(self.task_classes[t]) for t in names)}

    # -- accounting (numbers, not bytes; float32 storage = 4 bytes each) -------
    @abstractmethod
    def adapter_numbers_per_task(self) -> float:
        """Numbers stored per task for the adapter (no head)."""

    def shared_numbers(self) -> int:
        """Numbers stored once, whatever the number of tasks."""
        return 0

    @abstractmethod
    def trainable_numbers_last_task(self) -> int:
        """Adapter parameters trained for the most recent task (no head)."""

    def report(self) -> dict:
        """Method-specific, JSON-ready entries for ``results.json`` (e.g. Share's merges)."""
        return {}

    def restore_report(self, report: dict) -> None:
        """Take back what :meth:`report` returned when a run was checkpointed, where the store keeps
        less (:mod:`sharecl.resume`), so a resumed run reports the whole stream. Default: nothing."""

    def head_numbers_per_task(self) -> float:
        """Numbers stored per task outside the adapter: its head (Share adds its class prototypes)."""
        sizes = [(sum(p.numel() for p in self.heads.heads[n].parameters()) if n in self.heads else 0)
                 + sum(x.numel() for x in self.class_stats.get(n, ())) for n in self.task_names]
        return sum(sizes) / max(len(sizes), 1)

    def _features(self, inputs: list) -> torch.Tensor:
        """Pooled backbone features ``(N, hidden)``; the route tells covariance-aware layers which tokens are real."""
        batch = self.encoder.tokenize(inputs)
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None  # images: every token is real
        with self.router.use(token_mask=mask):
            return self.encoder.encode(batch)

    def _encode_head(self, inputs: list, task_name: str, training: bool) -> torch.Tensor:
        """Backbone + task head; builds an autograd graph only when ``training``."""
        with torch.set_grad_enabled(training and torch.is_grad_enabled()):
            return self.heads(self._features(inputs), task_name)

    # -- class-incremental inference -------------------------------------------
    def class_offsets(self) -> dict[str, int]:
        """First global class id of each task: classes are numbered in task order."""
        out, n = {}, 0
        for t in self.task_names:
            out[t] = n
            n += len(self.task_classes[t])
        return out

    def cil_logits(self, inputs: list) -> torch.Tensor:
        """Scores ``(N, total classes seen)`` with no task id; argmax is the global class.

        Default: one forward of the current model and every task's head, concatenated in task
        order (InfLoRA's and SD-LoRA's inference). Methods with task-specific weights override.

        Raises:
            UnsupportedScenarioError: if the method is task-incremental only.
        """
        self.check_scenario("cil")
        with torch.no_grad():
            return self._concat_heads(self._features(inputs))

    @property
    def one_forward_til_and_cil(self) -> bool:
        """True when :meth:`til_and_cil_logits` needs one backbone forward, not two: the features do
        not depend on the task and :meth:`cil_logits` is this class's default (every head on them)."""
        return self.task_independent_backbone and type(self).cil_logits is ContinualMethod.cil_logits

    @torch.no_grad()
    def til_and_cil_logits(self, inputs: list, task_name: str) -> list[torch.Tensor]:
        """``[logits(inputs, task_name), cil_logits(inputs)]``: ``(N, classes of the task)`` and
        ``(N, total classes seen)``, from one forward where :attr:`one_forward_til_and_cil`.

        Raises:
            UnsupportedScenarioError: if the method is task-incremental only.
        """
        self.check_scenario("cil")
        if not self.one_forward_til_and_cil:
            return [self.logits(inputs, task_name), self.cil_logits(inputs)]
        with self.routed(task_name):
            z = self._features(inputs)
        return [self.heads(z, task_name), self._concat_heads(z)]

    def _concat_heads(self, z: torch.Tensor) -> torch.Tensor:
        """Every task's head on features ``z`` ``(N, hidden)``, concatenated in task order ``(N, total classes)``."""
        return torch.cat([self.heads(z, n) for n in self.task_names], -1)

    @torch.no_grad()
    def input_covariances(self, inputs: list, batch_size: int = 64) -> dict[str, torch.Tensor]:
        """One no-grad pass over ``inputs``: ``{layer: mean x xᵀ}`` ``(d_in, d_in)`` float64 of
        every adapted layer's input, over real (non-padding) tokens, under the current routing.

        Under ``torchrun`` each rank passes its interleaved shard and the sums and token counts
        are added over ranks before dividing, so every rank gets the covariance of all of ``inputs``.
        """
        from sharecl import distributed as dist
        from sharecl.adapters.branches import StatsLinear

        layers = {n: m for n, m in self.layers.items() if isinstance(m, StatsLinear)}
        for m in layers.values():
            m.reset_stats()
        mine = list(dist.shard(inputs))
        with self.router.use(collect=True):
            for i in range(0, len(mine), batch_size):
                self._features(mine[i: i + batch_size])
        for m in layers.values():
            m.reduce_stats()
        return {n: m.covariance().cpu() for n, m in layers.items()}  # GPM algebra runs on the CPU

    # -- store hooks (storable methods) ----------------------------------------
    def head_tensors(self) -> dict[str, torch.Tensor]:
        """``heads.<task>.weight`` / ``.bias`` for every task with a head, and
        ``classstats.<task>.mean`` / ``.cov`` (or ``.cov_factor`` / ``.cov_diag``, low-rank) for
        every task with class statistics."""
        out = {}
        for tname in self.task_names:
            if tname in self.heads:
                for key, val in self.heads.heads[tname].state_dict().items():
                    out[f"heads.{tname}.{key}"] = val.detach().contiguous()
            if tname in self.class_stats:
                keys = ("mean", "cov") if len(self.class_stats[tname]) == 2 else ("mean", "cov_factor", "cov_diag")
                out.update({f"classstats.{tname}.{k}": x.contiguous() for k, x in zip(keys, self.class_stats[tname])})
        return out

    def load_tasks_and_heads(self, tensors: dict[str, torch.Tensor], tasks: list[dict]) -> None:
        """Restore the task list (manifest order) and the heads saved by :meth:`head_tensors`."""
        self.task_names, self.task_classes = [], {}
        for t in tasks:
            self.task_names.append(t["name"])
            self.task_classes[t["name"]] = list(t["classes"])
            if f"heads.{t['name']}.weight" in tensors:
                w = tensors[f"heads.{t['name']}.weight"]
                head = self.heads.add(t["name"], w.shape[0])
                head.load_state_dict({"weight": w, "bias": tensors[f"heads.{t['name']}.bias"]})
            if f"classstats.{t['name']}.mean" in tensors:
                keys = ("mean", "cov") if f"classstats.{t['name']}.cov" in tensors else ("mean", "cov_factor", "cov_diag")
                self.class_stats[t["name"]] = tuple(tensors[f"classstats.{t['name']}.{k}"] for k in keys)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a store needs (adapters, memories, heads). Storable methods override."""
        raise NotImplementedError(f"method {self.name!r} has no store format")

    def state_meta(self) -> dict:
        """JSON-ready state that is not a tensor (ranks, memory kinds, …), kept in the manifest."""
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], tasks: list[dict], meta: dict) -> None:
        """Inverse of :meth:`state_tensors` + :meth:`state_meta` on a freshly built method."""
        raise NotImplementedError(f"method {self.name!r} has no store format")

    def task_origin(self, task_name: str) -> str:
        """How a task was learned: ``"data"`` (trained) or ``"adapter"`` (a LoRA folded in without data)."""
        return "data"

    def check_task(self, task_name: str) -> None:
        if task_name not in self.task_classes:
            raise KeyError(f"unknown task {task_name!r}; known tasks: {self.task_names}")
