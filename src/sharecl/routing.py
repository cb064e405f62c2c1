"""Which task an adapted layer computes for: one routing context per wrapped model.

A method owns one :class:`Router` and hands it to every layer it wraps when it wraps it. The
method enters a route (``with router.use(task_index=2): model(...)``); each layer reads
:attr:`Router.current` in its forward. Nothing sets attributes on the layers from outside,
so two threads (a server answering two tasks at once) or a nested call never see each other's
route: the route lives in a :class:`contextvars.ContextVar`, one value per thread and per
asyncio task, restored when the ``with`` block exits, exceptions included (PEFT routes its
``adapter_names`` per call in the same spirit).

A route holds:

- ``task_index``: the one task a whole batch computes for (an int, the task's row in the
  method's tables), or None;
- ``row_tasks``: int64 ``(N,)``, a task per batch row (Share's mixed-task forward), or None;
- ``token_mask``: bool ``(N, L)``, which token positions are real (covariance statistics and
  DualLoRA's energies leave padding out), or None (every token is real);
- ``collect``: whether covariance-aware layers add this forward's inputs to their statistics;
- ``relevance``: a list a method passes down to receive what layers measure in this forward
  (DualLoRA's per-task relevance ``ρ``): an output travelling back through the route, never an
  attribute read off the layers afterwards.

Training state (the trainable tensors of the task being learned) is not a route: it belongs to
the layer from ``begin_task`` to ``end_task``, so a backward pass or gradient checkpointing
recomputing a forward in another thread sees it too.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from dataclasses import dataclass, replace

import torch

__all__ = ["Route", "Router"]

_ids = itertools.count()


@dataclass(frozen=True)
class Route:
    """One routing decision (see the module docstring); immutable, the default routes nowhere."""

    task_index: int | None = None
    row_tasks: torch.Tensor | None = None
    token_mask: torch.Tensor | None = None
    collect: bool = False
    relevance: list | None = None


_NOWHERE = Route()


class Router:
    """A per-model routing context. Layers hold a reference; methods enter routes with :meth:`use`."""

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[Route] = contextvars.ContextVar(f"sharecl-route-{next(_ids)}", default=_NOWHERE)

    def __deepcopy__(self, memo) -> Router:
        return self  # a deep-copied model stays routed by its method (a ContextVar cannot be copied)

    def __reduce__(self):
        return (Router, ())  # an unpickled model gets a fresh, empty routing context

    @property
    def current(self) -> Route:
        """The route of the innermost :meth:`use` block of this thread (or asyncio task)."""
        return self._var.get()

    @contextlib.contextmanager
    def use(self, **changes):
        """Enter a route: the current one with ``changes`` applied (fields of :class:`Route`).

        ``with router.use(task_index=1): …`` routes to task 1; nested blocks refine the outer
        route (``use(token_mask=m)`` inside keeps the task). The previous route is restored on exit.

        Raises:
            TypeError: for a field :class:`Route` does not have.
        """
        token = self._var.set(replace(self._var.get(), **changes))
        try:
            yield self
        finally:
            self._var.reset(token)

    @contextlib.contextmanager
    def nowhere(self):
        """Route to no task (the base model, or the training task's state) for the block."""
        token = self._var.set(_NOWHERE)
        try:
            yield self
        finally:
            self._var.reset(token)
