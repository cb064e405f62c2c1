"""Share's per-task coefficients as a checkpoint plus a log of merges (METHODS.md §1, [ours]).

Every Share merge re-expresses every old task in the new basis, ``C[i] ← R C[i]`` with the
small change of basis ``R = U'ᵀ U`` (``(k', k)``). Doing that to the stored coefficients would
make every new task rewrite every old one. Instead, one side of one layer keeps

* ``base``: the coefficients ``(T₀, k₀, p)`` of the tasks up to the last checkpoint, in the
  coordinates of the basis as it was then;
* ``steps``: one entry per merge since, ``(R (k', k) float64, c (k', p))``: the change of basis
  that merge applied, and the new task's coefficients in the basis it produced.

Task ``i``'s current coefficients are ``R_N ⋯ R_{j+1} c_j`` (task j of the log) or
``R_N ⋯ R_1 base[i]``; :meth:`CoefficientLog.materialize` computes them in one pass, backwards,
in float64, and casts once. It is a pure function of ``base`` and ``steps``: a store that
writes them and a process that reads them back get the same bits. Only the bases and ``steps``
are new after a merge, so a store can append them (:mod:`sharecl.store`) instead of rewriting
every task; :meth:`CoefficientLog.compact` folds the log into a new ``base``.
"""

from __future__ import annotations

import torch

__all__ = ["CoefficientLog"]

_F = torch.float64


class CoefficientLog:
    """Checkpointed coefficients plus the merges since, for one side of one Share layer.

    Args:
        base: ``(T₀, k₀, p)`` coefficients as of the checkpoint (any float dtype; kept as given).
    """

    def __init__(self, base: torch.Tensor):
        if base.ndim != 3:
            raise ValueError(f"base coefficients must be (T, k, p), got {tuple(base.shape)}")
        self.base = base
        self.steps: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._new64: list[torch.Tensor] = []  # each step's new coefficients in float64 (what left_multiply reads)
        self.epoch = 0  # how many times the log was folded: a store appends only onto the same checkpoint

    @property
    def p(self) -> int:
        return self.base.shape[2]

    @property
    def num_tasks(self) -> int:
        return self.base.shape[0] + len(self.steps)

    def append(self, change: torch.Tensor, new: torch.Tensor) -> None:
        """Record a merge: ``change`` ``(k', k)`` (``k`` = the current basis size), ``new`` ``(k', p)``.

        Raises:
            ValueError: if the shapes do not chain onto the log.
        """
        k_now = self.steps[-1][0].shape[0] if self.steps else self.base.shape[1]
        if change.ndim != 2 or change.shape[1] != k_now or new.shape != (change.shape[0], self.p):
            raise ValueError(f"merge step does not chain: change {tuple(change.shape)}, new {tuple(new.shape)}, "
                             f"current basis size {k_now}, p = {self.p}")
        self.steps.append((change.to(_F), new.detach().to(self.base.dtype)))
        self._new64.append(self.steps[-1][1].to(_F))

    def set_last(self, new: torch.Tensor) -> None:
        """Replace the newest task's coefficients (fine-tuning after its merge); ``new`` ``(k, p)``."""
        if not self.steps:
            raise ValueError("no merge since the checkpoint: compact the log and change the base instead")
        change, old = self.steps[-1]
        if new.shape != old.shape:
            raise ValueError(f"coefficients {tuple(new.shape)} do not replace {tuple(old.shape)}")
        self.steps[-1] = (change, new.detach().to(old.dtype))
        self._new64[-1] = self.steps[-1][1].to(_F)

    @torch.no_grad()
    def materialize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Every task's coefficients in the current basis, ``(T, k, p)`` in ``dtype`` (the base's
        by default): backwards through the log, composing the changes of basis in float64; the
        composed change is applied to the checkpoint's ``T0`` tasks in ``dtype`` (one matmul of
        depth k over all of them: the only pass that grows with the task count)."""
        dtype = dtype or self.base.dtype
        if not self.steps:
            return self.base.to(dtype).contiguous()
        k = self.steps[-1][0].shape[0]
        out = torch.empty(self.num_tasks, k, self.p, dtype=dtype, device=self.base.device)
        P = torch.eye(k, dtype=_F, device=self.base.device)
        T0 = self.base.shape[0]
        for j in range(len(self.steps) - 1, -1, -1):
            change, new = self.steps[j]
            out[T0 + j] = (P @ new.to(_F)).to(dtype)
            P = P @ change
        if T0:
            out[:T0] = P.to(dtype) @ self.base.to(dtype)
        return out

    @torch.no_grad()
    def left_multiply(self, M: torch.Tensor) -> torch.Tensor:
        """``M @ C_i`` for every task ``i``, ``(T, q, p)`` float64, for ``M`` ``(q, k)`` (``k`` the
        current basis size), without materialising the coefficients: backwards through the log
        starting from ``M`` instead of the identity, so the checkpoint's ``T0`` tasks cost one
        product of depth ``k`` with ``q`` rows (a Share merge reads every old task only through the
        ``(q, k)`` map onto what the new basis drops, ``q ≤ r``)."""
        P = M.to(_F)
        out = torch.empty(self.num_tasks, P.shape[0], self.p, dtype=_F, device=self.base.device)
        T0 = self.base.shape[0]
        maps = []  # maps[j] = M R_N ⋯ R_{j+1}: what reads step j's new coefficients
        for j in range(len(self.steps) - 1, -1, -1):
            maps.append(P)
            P = P @ self.steps[j][0]
        maps.reverse()
        if maps and all(x.shape == maps[0].shape for x in maps):  # one batched product (the basis size settled)
            out[T0:] = torch.stack(maps) @ self._stacked_new()
        else:
            for j, x in enumerate(maps):
                out[T0 + j] = x @ self._new64[j]
        if T0:  # one GEMM over every checkpointed task: (T0·p, k) @ (k, q)
            out[:T0] = (self._base_rows() @ P.T).reshape(T0, self.p, -1).transpose(1, 2)
        return out

    def _stacked_new(self) -> torch.Tensor:
        """Every step's new coefficients, float64 ``(S, k, p)`` (steps of one basis size), cached."""
        cached = getattr(self, "_stack", None)
        if cached is None or cached[0] != len(self._new64) or cached[1] is not self._new64[-1]:
            cached = self._stack = (len(self._new64), self._new64[-1], torch.stack(self._new64))
        return cached[2]

    def _base_rows(self) -> torch.Tensor:
        """The checkpoint as float64 rows ``(T0·p, k0)`` (row ``t·p + j`` = column j of task t),
        kept until the checkpoint changes: every merge reads it."""
        cached = getattr(self, "_rows", None)
        if cached is None or cached[0] is not self.base:
            T0, k0, p = self.base.shape
            cached = self._rows = (self.base, self.base.to(_F).transpose(1, 2).reshape(T0 * p, k0).contiguous())
        return cached[1]

    def compact(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Fold the log into the base (``base ← materialize()``, ``steps ← []``); returns the base."""
        self.base = self.materialize(dtype)
        self.steps, self._new64 = [], []
        self.epoch += 1
        return self.base
