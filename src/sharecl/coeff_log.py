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
        self._comp: tuple | None = None  # what _composed keeps between merges

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
        current basis size), without materialising the coefficients in the layer's dtype: two
        products with the float64 state :meth:`_composed` keeps up to date, one over the log's
        tasks and one of depth ``k`` over the checkpoint's ``T0`` (a Share merge reads every old
        task only through the ``(q, k)`` map onto what the new basis drops, ``q ≤ r``)."""
        P = M.to(_F)
        base_map, now = self._composed()
        T0, S = self.base.shape[0], len(self.steps)
        out = torch.empty(self.num_tasks, P.shape[0], self.p, dtype=_F, device=self.base.device)
        if S:  # the log's tasks: one GEMM (q, k) @ (k, S·p)
            out[T0:] = (P @ now).reshape(P.shape[0], S, self.p).permute(1, 0, 2)
        if T0:  # one GEMM over every checkpointed task: (T0·p, k0) @ (k0, q)
            out[:T0] = (self._base_rows() @ (P @ base_map).T).reshape(T0, self.p, -1).transpose(1, 2)
        return out

    def _composed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R_N ⋯ R_1 (k, k0), [c_1' … c_S'] (k, S·p))`` in float64: the checkpoint's composed
        change of basis and every logged task's coefficients in the current basis, side by side.

        Kept between calls and brought up to date by the merges appended since (one
        ``(k', k) @ (k, S·p)`` product each), so a stream of merges never walks the whole log again;
        rebuilt by one backward pass when the checkpoint or an already-seen step changed (a
        compaction, :meth:`set_last`). Only merges read it; :meth:`materialize` stays a pure
        function of ``base`` and ``steps``."""
        c, S = self._comp, len(self.steps)
        if c is None or c[2] is not self.base or c[0] > S or (c[0] and self.steps[c[0] - 1] is not c[1]):
            k = self.steps[-1][0].shape[0] if S else self.base.shape[1]
            P, cols = torch.eye(k, dtype=_F, device=self.base.device), []
            for j in range(S - 1, -1, -1):
                cols.append(P @ self._new64[j])
                P = P @ self.steps[j][0]
            cols.reverse()
            base_map, now = P, (torch.cat(cols, 1) if cols else P.new_zeros(k, 0))
        else:
            base_map, now = c[3], c[4]
            for j in range(c[0], S):
                change = self.steps[j][0]
                base_map, now = change @ base_map, torch.cat([change @ now, self._new64[j]], 1)
        self._comp = (S, self.steps[-1] if S else None, self.base, base_map, now)
        return base_map, now

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
