"""Inference for batches whose rows belong to different tasks (the server's micro-batches).

A mixin of :class:`~sharecl.methods.base.ContinualMethod`: it uses the method's ``check_task``,
``_features``, ``heads``, ``logits``, ``task`` and ``encoder``, and its ``task_independent_backbone``
flag. Share overrides :meth:`MixedTaskInference.mixed_route` with its per-row coefficient gather
(METHODS.md §1 "Inference").
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ClassVar

import torch


class MixedTaskInference:
    """``mixed_route``, ``mixed_logits`` and ``mixed_generate`` for a continual method."""

    # what the mixin reads of the method it is mixed into (sharecl.methods.base.ContinualMethod)
    encoder: Any
    heads: Any
    task_independent_backbone: ClassVar[bool]
    check_task: Callable[[str], None]
    task: Callable[[str], contextlib.AbstractContextManager]
    logits: Callable[..., torch.Tensor]
    _features: Callable[[list], torch.Tensor]

    def mixed_route(self, task_names: list[str]) -> contextlib.AbstractContextManager | None:
        """A context in which **one** forward computes every batch row for its own task
        (``task_names[i]`` for row ``i``), or None when the method needs a forward per task.

        Default: methods whose backbone does not depend on the task (InfLoRA, SD-LoRA) need no
        route; Share gathers each row's coefficients (:class:`~sharecl.routing.Route` ``row_tasks``).

        Raises:
            KeyError: for an unknown task.
        """
        for t in set(task_names):
            self.check_task(t)
        return contextlib.nullcontext() if self.task_independent_backbone else None

    @torch.no_grad()
    def mixed_logits(self, inputs: list, task_names: list[str]) -> list[torch.Tensor]:
        """Logits for a batch whose rows belong to different tasks: one ``(C_task,)`` vector per row.

        One forward in all where :meth:`mixed_route` gives a route (Share's per-row gather,
        METHODS.md §1 "Inference"; a task-independent backbone), else one forward per distinct task.

        Raises:
            ValueError: if the lengths differ; KeyError: for an unknown task.
        """
        if len(inputs) != len(task_names):
            raise ValueError(f"{len(inputs)} inputs but {len(task_names)} task names")
        route = self.mixed_route(task_names)
        if route is not None:
            with route:
                z = self._features(list(inputs))
            return [self.heads(z[i: i + 1], t)[0] for i, t in enumerate(task_names)]
        out: list[torch.Tensor | None] = [None] * len(inputs)
        for t in dict.fromkeys(task_names):
            idx = [i for i, n in enumerate(task_names) if n == t]
            for i, row in zip(idx, self.logits([inputs[i] for i in idx], t)):
                out[i] = row
        return [row for row in out if row is not None]  # every row was filled: each belongs to a task

    @torch.no_grad()
    def mixed_generate(self, prompts: list, task_names: list[str], max_new_tokens: list[int]) -> list[list[int]]:
        """Greedy answers (new token ids, end-of-turn excluded) for a batch of prompts whose rows
        belong to different tasks; row ``i`` stops after ``max_new_tokens[i]`` tokens.

        One ``generate`` call in all where :meth:`mixed_route` gives a route (Share: every row
        gathers its own task's ``M_t`` at every decoding step, the KV cache included), else one
        per distinct task. Greedy decoding does not look ahead, so cutting a longer answer after
        ``n`` tokens equals generating ``n`` tokens.

        Raises:
            ValueError: if the lengths differ or a limit is < 1; KeyError: for an unknown task;
            TypeError: if the backbone is not a causal LM.
        """
        from sharecl.generation.lm import CausalLM

        lm = self.encoder
        if not isinstance(lm, CausalLM):
            raise TypeError(f"generation needs a causal LM backbone; this method wraps a {type(lm).__name__}")
        if not len(prompts) == len(task_names) == len(max_new_tokens):
            raise ValueError(f"{len(prompts)} prompts, {len(task_names)} task names and {len(max_new_tokens)} limits")
        if not prompts:
            return []
        if min(max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be ≥ 1, got {min(max_new_tokens)}")
        route = self.mixed_route(task_names)
        ids: list
        if route is not None:
            with route:
                ids = lm.generate_ids(list(prompts), max_new_tokens=max(max_new_tokens))
        else:
            ids = [None] * len(prompts)
            for t in dict.fromkeys(task_names):
                idx = [i for i, n in enumerate(task_names) if n == t]
                with self.task(t):
                    rows = lm.generate_ids([prompts[i] for i in idx], max_new_tokens=max(max_new_tokens[i] for i in idx))
                for i, row in zip(idx, rows):
                    ids[i] = row
        return [row[:n] for row, n in zip(ids, max_new_tokens)]
