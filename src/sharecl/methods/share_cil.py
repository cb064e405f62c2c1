"""Share without a task id: how :class:`~sharecl.methods.share.ShareMethod` identifies the task
in class-incremental inference (METHODS.md §1 "Inference"; the rules are [ours]).

Every input runs under every task's coefficients in one mixed-task batch; each task's head scores
its own classes and a per-task score decides which task answers: class prototypes (the default),
energy, max-prob, max-logit, the Gaussian (Mahalanobis) likelihood of the input's features
under the task's class statistics, or (``--align``) a task-identification classifier on the base
model's features, aligned on every seen class's stored Gaussian. This module holds those rules and
the statistics they keep; :class:`ShareClassIncremental` is mixed into ``ShareMethod``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sharecl.backbone import TaskHeads
from sharecl.data.tasks import Task
from sharecl.methods.base import ContinualMethod

__all__ = ["CIL_SCORES", "MAHALANOBIS_SHRINK", "ShareClassIncremental", "set_top_tasks"]

#: Class-incremental scores for Share's task identification.
CIL_SCORES = ("prototype", "energy", "max-prob", "max-logit", "mahalanobis", "aligned")

#: Shrinkage of the pooled class covariance towards ``trace/hidden · I`` in the Mahalanobis score [ours].
MAHALANOBIS_SHRINK = 0.1


def set_top_tasks(method, m: int | None) -> None:
    """Set ``config.cil_top_tasks`` of a loaded method (``predict``/``serve --top-tasks``, benchmarks).

    Raises:
        ValueError: ``m < 1``, or a method that is not a Share model learned with ``--align``
            (only the aligned identification can choose tasks before running them).
    """
    if m is not None:
        if m < 1:
            raise ValueError(f"--top-tasks (cil_top_tasks) must be ≥ 1, got {m}")
        if not isinstance(method, ShareClassIncremental) or method.config.cil_score != "aligned":
            raise ValueError(f"--top-tasks (cil_top_tasks) needs a Share store learned with --align; this {method.name} "
                             "model has no aligned task identification: drop --top-tasks")
    method.config.cil_top_tasks = m


class ShareClassIncremental(ContinualMethod):
    """Class-incremental scoring for Share: the base of :class:`~sharecl.methods.share.ShareMethod`,
    which builds the state declared here."""

    config: Any  # a ShareConfig
    prototypes: dict[str, torch.Tensor]
    taskid_heads: TaskHeads

    @torch.no_grad()
    def task_class_statistics(self, task: Task, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Class means ``(C, hidden)`` and covariances ``(C, hidden, hidden)`` (float32) of
        ``task``'s training features under the task's own coefficients, for the Mahalanobis
        task-identification score (:meth:`cil_logits`); kept as computed, like the prototypes."""
        from sharecl.align import class_statistics

        with self.task(task.name):
            feats = self.batched(self._features, task.train_inputs, batch_size)
        return class_statistics(feats, torch.tensor(task.train_labels), task.num_classes)

    @torch.no_grad()
    def class_prototypes(self, task: Task, batch_size: int = 64) -> torch.Tensor:
        """Class-mean pooled features of ``task``'s training inputs under the task's own (merged)
        coefficients: float32 ``(num_classes, hidden)`` on the CPU [ours; the nearest-class-mean
        rule, Rebuffi et al. 2017 §2.1, used here to identify the task in class-incremental inference].

        Computed once, right after the task's merge, from unaugmented inputs; later merges move
        the task's ``ΔW`` by the recorded drift and leave its prototypes as they were. Under
        ``torchrun`` each rank sums its shard and the sums are all-reduced (float64).
        """
        from sharecl import distributed as dist

        C = task.num_classes
        sums = torch.zeros(C, self.encoder.hidden_size, dtype=torch.float64)
        counts = torch.zeros(C, dtype=torch.float64)
        xs, ys = dist.shard(task.train_inputs), dist.shard(task.train_labels)
        with self.task(task.name):
            for i in range(0, len(xs), batch_size):
                y = torch.tensor(ys[i: i + batch_size])
                sums.index_add_(0, y, self._features(list(xs[i: i + batch_size])).double().cpu())
                counts += torch.bincount(y, minlength=C).double()
        sums, counts = dist.all_reduce_sum(sums), dist.all_reduce_sum(counts)
        return (sums / counts.clamp_min(1.0)[:, None]).float()

    @torch.no_grad()
    def cil_features(self, inputs: list) -> torch.Tensor:
        """The **base model's** pooled features ``(N, hidden)`` float32 (no task's coefficients).

        Share never changes the pretrained weights ``W0`` (every task lives in its coefficients),
        so these features, and the class statistics taken on them, never go stale: the one
        feature space in which Share's classes can be aligned across tasks [ours]."""
        with self.router.nowhere():
            return self._features(list(inputs))

    def align_classifier(self, task: Task, cfg) -> dict:
        """``--align`` for Share [ours]: keep ``task``'s class statistics on the base model's
        features (:meth:`cil_features`), add a task-identification head for it (``C`` classes on
        ``hidden`` base features, PyTorch's default init), then re-train every task's
        identification head on features sampled from every seen class's Gaussian
        (:func:`sharecl.align.align_heads`, SLCA §3.3). Sets ``config.cil_score = "aligned"``:
        class-incremental inference then scores class ``j`` of task ``t`` by
        ``log p(t | x) + log p(j | x, t)``, the first from the aligned heads on base features, the
        second from task ``t``'s own head under its coefficients (:meth:`cil_logits`). Task heads
        are untouched, so task-incremental predictions do not change. ``cfg.align_recompute`` is
        moot (base features never move).

        Returns:
            ``{"loss_before", "loss_after", "classes"}`` of the alignment (nats).

        Raises:
            ValueError: with ``cil_score="mahalanobis"`` (its statistics are under each task's
                coefficients; the two cannot share ``class_stats``), a class with < 2 examples, or
                an old task learned without ``--align``.
        """
        from sharecl.align import align_heads

        if self.config.cil_score == "mahalanobis":
            raise ValueError("--align and cil_score='mahalanobis' both keep class statistics, on different features; "
                             "choose one (--align sets cil_score='aligned')")
        self.class_stats[task.name] = self.feature_statistics(task, cfg)
        if task.name not in self.taskid_heads:
            self.taskid_heads.add(task.name, task.num_classes, self.generator(19))
        names = [t for t in self.task_names if t in self.heads]
        missing = [t for t in names if t not in self.class_stats or t not in self.taskid_heads]
        if missing:
            raise ValueError(f"tasks {missing} were learned without --align (no base-feature class statistics); "
                             "Share's aligned task identification needs every task's")
        info = align_heads([self.taskid_heads.heads[t] for t in names], [self.class_stats[t] for t in names],
                           steps=cfg.align_steps, per_class=cfg.align_samples, lr=cfg.align_lr, generator=self.generator(17))
        self.config.cil_score = "aligned"
        return {**info, "classes": sum(len(self.task_classes[t]) for t in names)}

    def taskid_tensors(self) -> dict[str, torch.Tensor]:
        """``taskid.<task>.weight`` / ``.bias`` of every task-identification head (all of them:
        every alignment re-trains every one)."""
        return {f"taskid.{t}.{k}": v.detach().contiguous() for t in self.task_names if t in self.taskid_heads
                for k, v in self.taskid_heads.heads[t].state_dict().items()}

    def load_taskid(self, tensors: dict[str, torch.Tensor], tasks: list[dict]) -> None:
        """Inverse of :meth:`taskid_tensors`."""
        for t in tasks:
            if f"taskid.{t['name']}.weight" in tensors:
                w = tensors[f"taskid.{t['name']}.weight"]
                head = self.taskid_heads.add(t["name"], w.shape[0])
                head.load_state_dict({"weight": w, "bias": tensors[f"taskid.{t['name']}.bias"]})

    @torch.no_grad()
    def cil_logits(self, inputs: list, score: str | None = None) -> torch.Tensor:
        """Class-incremental scores ``(N, total classes)``: Share's task-identification rule [ours].

        The Share paper selects coefficients by task id. Without one, every input is run under
        every task's coefficients in **one** mixed-task batched forward (``N × T`` rows, METHODS.md
        §1 "Inference"), each task's head scores its own classes, and the scores are
        concatenated in task order so that the argmax picks a task and a class at once:

        - ``"prototype"`` (default): the task whose class prototype (:meth:`class_prototypes`) is
          most cosine-similar to the input's features under that task's coefficients wins; the
          task's head ranks its classes (its best class gets the task's score, the others less).
          Costs ``C × hidden`` stored numbers per task.
        - ``"energy"``: the task with the largest ``logsumexp`` of its logits wins
          (its best class gets that score, the others less); the energy score of
          out-of-distribution detection.
        - ``"max-prob"``: each task's log-softmax; the most confident task (highest maximum
          softmax probability) wins. Tasks with fewer classes find confidence easier.
        - ``"max-logit"``: raw logits; the task with the largest logit wins.
        - ``"mahalanobis"``: each task's Gaussian class-conditional log-likelihood of the input's
          features under that task's coefficients — class means and one pooled covariance per
          task (shrunk by :data:`MAHALANOBIS_SHRINK` towards ``trace/hidden · I``), best class,
          including ``−½ log det Σ_t`` so tasks compare — wins; the task's head ranks its classes.
          Needs the statistics :meth:`task_class_statistics` keeps when ``cil_score`` is
          ``"mahalanobis"`` at training time (issue 16; Lee et al. 2018's Mahalanobis score).
        - ``"aligned"`` (set by ``--align``, :meth:`align_classifier`): ``log p(t | x)`` from the
          task-identification heads on the base model's features (softmax over every seen class,
          summed over the task's classes) plus the task head's log-softmax under its coefficients:
          a joint log-probability. One more forward pass (the base model). With
          ``config.cil_top_tasks = m`` each input runs only under its ``m`` tasks of highest
          ``log p(t | x)`` (:meth:`_aligned_top_tasks`); the other tasks' classes score ``-inf``.

        ``benchmarks/bench_cil_rules.py`` (3 seeds each; the streams have no validation split, so
        the default was chosen on test splits): on ``wordnet-cil`` prototype and energy tie, on
        ``fmnist-cil`` prototype identifies the task far more often (see the README).

        Args:
            score: overrides ``config.cil_score``.

        Raises:
            ValueError: an unknown score, or ``"prototype"`` when a task has no prototypes (stores
                written before prototypes existed: pass ``score="energy"``); ``cil_top_tasks``
                with a score other than ``"aligned"``.

        Cost: ``T`` forward passes' worth of compute, in one batch (``1 + m`` with ``cil_top_tasks``).
        """
        score = score or self.config.cil_score
        if score not in CIL_SCORES:
            raise ValueError(f"score must be one of {CIL_SCORES}, got {score!r}")
        top = self.config.cil_top_tasks
        if top is not None and score != "aligned":
            raise ValueError(f"cil_top_tasks={top} (--top-tasks) picks tasks by the aligned identification, but the score is {score!r}: "
                             "learn the store with --align, or drop cil_top_tasks")
        missing = [t for t in self.task_names if t not in self.prototypes]
        if score == "prototype" and missing:
            raise ValueError(f"task(s) {missing} have no class prototypes (learned by an older sharecl); "
                             f"use the 'energy' score for this store")
        if score == "aligned":
            missing = [t for t in self.task_names if t not in self.taskid_heads]
            if missing:
                raise ValueError(f"task(s) {missing} have no task-identification head: they were learned without --align; "
                                 "use 'prototype'")
            base = self.cil_features(list(inputs))  # one forward of the base model for every task's identification head
            logq = torch.log_softmax(torch.cat([self.taskid_heads(base, t) for t in self.task_names], -1), -1)
            sizes = [len(self.task_classes[t]) for t in self.task_names]
            log_task = torch.stack([x.logsumexp(-1) for x in logq.split(sizes, -1)], -1)  # (N, T)
            if top is not None and top < len(self.task_names):
                return self._aligned_top_tasks(list(inputs), log_task, top)
        if score == "mahalanobis":
            if len(self.taskid_heads.heads):
                raise ValueError("this model's class statistics are on the base model's features (learned with --align); "
                                 "use 'aligned' or 'prototype'")
            missing = [t for t in self.task_names if t not in self.class_stats]
            if missing:
                raise ValueError(f"task(s) {missing} have no class statistics: they were learned without "
                                 "cil_score='mahalanobis' (--set share.cil_score=mahalanobis); use 'prototype'")
            from sharecl.align import max_class_log_likelihood, pooled_gaussian

            gauss = {t: pooled_gaussian(self.class_stats[t][0], self.class_stats[t][1], shrink=MAHALANOBIS_SHRINK)
                     for t in self.task_names}
        T, N = len(self.task_names), len(inputs)
        rows = torch.arange(T, device=self.encoder.device).repeat_interleave(N)
        with self.router.use(task_index=None, row_tasks=rows):
            z = self._features(list(inputs) * T)
        out = []
        for i, t in enumerate(self.task_names):
            logits = self.heads(z[i * N:(i + 1) * N], t)
            logp = torch.log_softmax(logits, -1)
            if score == "prototype":
                proto = nn.functional.normalize(self.prototypes[t].to(logits), dim=-1)
                sim = nn.functional.normalize(z[i * N:(i + 1) * N], dim=-1) @ proto.T
                out.append(sim.max(-1, keepdim=True).values + logp - logp.max(-1, keepdim=True).values)
            elif score == "aligned":
                out.append(log_task[:, i:i + 1].to(logp) + logp)
            elif score == "mahalanobis":
                ll = max_class_log_likelihood(z[i * N:(i + 1) * N], gauss[t])[:, None].to(logits)
                out.append(ll + logp - logp.max(-1, keepdim=True).values)
            elif score == "max-prob":
                out.append(logp)
            elif score == "max-logit":
                out.append(logits)
            else:
                out.append(torch.logsumexp(logits, -1, keepdim=True) + logp - logp.max(-1, keepdim=True).values)
        return torch.cat(out, -1)

    @torch.no_grad()
    def _aligned_top_tasks(self, inputs: list, log_task: torch.Tensor, m: int) -> torch.Tensor:
        """The aligned score run under each input's ``m`` most likely tasks only [ours].

        ``log_task`` ``(N, T)`` is ``log p(t | x)``; row ``j·N + i`` of one mixed-task forward runs
        input ``i`` under its ``j``-th most likely task. Returns ``(N, total classes)``: for the
        chosen tasks ``log p(t | x) + log p(j | x, t)`` as :meth:`cil_logits` computes it, ``-inf``
        for every class of the others.
        """
        N = len(inputs)
        chosen = log_task.topk(m, -1).indices  # (N, m)
        rows = chosen.T.reshape(-1).to(self.encoder.device)  # (m·N,): choice-major
        with self.router.use(task_index=None, row_tasks=rows):
            z = self._features(inputs * m)
        offsets = self.class_offsets()
        total = sum(len(self.task_classes[t]) for t in self.task_names)
        out = torch.full((N, total), float("-inf"), dtype=z.dtype, device=z.device)
        which = torch.arange(N, device=z.device).repeat(m)  # input of every row
        log_task = log_task.to(z.device)
        for i, t in enumerate(self.task_names):
            idx = (rows == i).nonzero().flatten()
            if len(idx):
                logp = torch.log_softmax(self.heads(z[idx], t), -1)
                o = offsets[t]
                out[which[idx], o:o + logp.shape[-1]] = log_task[which[idx], i:i + 1].to(logp) + logp
        return out
