"""Input-subspace memories for gradient-projection methods (InfLoRA, DualLoRA).

A layer's *input covariance* ``C = mean_tokens x xᵀ`` ``(d_in, d_in)`` (uncentred, over
every non-padding token) summarises the subspace a task's gradients live in: a linear
layer's weight gradient is ``δ xᵀ``, so its rows lie in the span of the inputs.
:class:`DualGPM` keeps an orthonormal basis of the input space earlier tasks used, as in
InfLoRA (Liang & Li, CVPR 2024, §3.3, and its official code): it stores the protected
basis ``M`` ``(d_in, m)`` while ``m ≤ d_in/2`` and its orthonormal complement ``Q``
``(d_in, d_in − m)`` after that, whichever is smaller.

Energy is measured as InfLoRA's code does, with the squared singular values of ``C``
(σ⁴ of the raw inputs), and the threshold ``ε_t`` rises linearly towards 1 over a stream
(:func:`inflora_threshold`). One deliberate difference from the official code: we keep the
*smallest* basis whose kept energy reaches ``ε`` (the code keeps one direction fewer,
just under ``ε``), so "the memory keeps at least ``ε`` of the energy" is a guarantee that
tests check.
"""

from __future__ import annotations

import torch

__all__ = ["DualGPM", "inflora_threshold", "memory_threshold", "top_directions", "complement", "memory_tensors", "load_memories"]


def inflora_threshold(eps: float, task_index: int, num_tasks: int | None) -> float:
    """``ε_t = ε + (1 − ε)·t/T`` for the 0-based ``task_index`` t of ``num_tasks`` T.

    InfLoRA's official schedule (``lamb → lame = 1``). With ``num_tasks=None`` (an open-ended
    store: the number of tasks is unknown) the threshold stays at ``eps``.

    Raises:
        ValueError: if ``eps`` is not in (0, 1] or ``task_index`` is outside ``[0, T)``.
    """
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"the memory threshold eps must be in (0, 1], got {eps}")
    if num_tasks is None:
        return eps
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside a stream of {num_tasks} tasks")
    return eps + (1.0 - eps) * task_index / num_tasks


def memory_threshold(eps: float, task_index: int, num_tasks: int | None) -> float:
    """:func:`inflora_threshold` when the stream's length is known and covers ``task_index``,
    else the fixed ``eps`` (an open-ended store, or a task beyond the announced stream)."""
    known = num_tasks is not None and num_tasks > task_index
    return inflora_threshold(eps, task_index, num_tasks if known else None)


def _energy_count(sq: torch.Tensor, start: float, total: float, eps: float, limit: int) -> int:
    """Smallest k ≤ limit with ``(start + sum(sq[:k])) / total ≥ eps``."""
    if total <= 0 or start / total >= eps:
        return 0
    reached = ((start + torch.cumsum(sq, 0)) / total >= eps - 1e-12).nonzero()
    return min(int(reached[0]) + 1 if len(reached) else len(sq), limit)


def top_directions(C: torch.Tensor, r: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``r`` orthonormal input directions ``(d_in, r)`` float64: the top left singular vectors of ``C``.

    When ``exclude`` (orthonormal ``(d_in, m)``) is given the directions are orthogonal to it
    even where ``C`` has fewer than ``r`` non-zero singular values (the missing directions
    are filled from the complement of ``exclude`` and what was found).
    """
    d = C.shape[0]
    if r > d:
        raise ValueError(f"cannot choose {r} directions in a {d}-dimensional input space")
    U, S, _ = torch.linalg.svd(C.double())
    keep = int((S > S[0] * 1e-10).sum()) if S.numel() and S[0] > 0 else 0
    X = U[:, : min(r, keep)]
    if exclude is not None and exclude.numel():
        X = X - exclude @ (exclude.T @ X)
        X, _ = torch.linalg.qr(X) if X.shape[1] else (X, None)
    if X.shape[1] < r:
        taken = X if exclude is None or not exclude.numel() else torch.cat([exclude.double(), X], 1)
        X = torch.cat([X, complement(taken, r - X.shape[1])], 1)
    return X


def complement(basis: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` orthonormal columns ``(d, n)`` float64 orthogonal to orthonormal ``basis`` ``(d, k)``.

    Deterministic (from a full SVD), so every rank and every rerun gets the same memory.
    """
    d, k = basis.shape
    if k + n > d:
        raise ValueError(f"cannot find {n} directions orthogonal to a rank-{k} basis in dimension {d}")
    if k == 0:
        return torch.eye(d, dtype=torch.float64)[:, :n]
    U, _, _ = torch.linalg.svd(basis.double(), full_matrices=True)
    return U[:, k: k + n]


class DualGPM:
    """DualGPM memory of one layer's protected input space (InfLoRA §3.3).

    Attributes:
        d: input dimension ``d_in``.
        kind: ``"remove"`` (``basis`` is the protected ``M``) or ``"retain"`` (``basis`` is
            the complement ``Q`` of the protected space).
        basis: orthonormal columns, float64, ``(d, m)`` or ``(d, d − m)``; ``None`` before
            the first update.
    """

    def __init__(self, d: int):
        self.d = d
        self.kind = "remove"
        self.basis: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """``m``, the dimension of the protected space."""
        if self.basis is None:
            return 0
        return self.basis.shape[1] if self.kind == "remove" else self.d - self.basis.shape[1]

    @property
    def numel(self) -> int:
        """Numbers stored for this memory (its basis, whichever kind)."""
        return 0 if self.basis is None else self.basis.numel()

    def design(self, C: torch.Tensor, r: int) -> torch.Tensor:
        """``r`` orthonormal directions ``(d, r)`` float64 inside ``C``'s input space and outside the
        protected space: top left singular vectors of :meth:`residual` (InfLoRA's designed ``A_t``ᵀ)."""
        return top_directions(self.residual(C), r, exclude=self.protected())

    def protected(self) -> torch.Tensor:
        """Orthonormal basis ``M`` ``(d, m)`` float64 of the protected space."""
        if self.basis is None:
            return torch.zeros(self.d, 0, dtype=torch.float64)
        if self.kind == "remove":
            return self.basis
        return complement(self.basis, self.d - self.basis.shape[1])

    def residual(self, C: torch.Tensor) -> torch.Tensor:
        """``Ĉ = C − M Mᵀ C`` (or ``Q Qᵀ C``): the part of ``C`` outside the protected space."""
        C = C.double()
        if self.basis is None:
            return C
        if self.kind == "remove":
            return C - self.basis @ (self.basis.T @ C)
        return self.basis @ (self.basis.T @ C)

    def kept_energy(self, C: torch.Tensor) -> float:
        """Fraction of ``C``'s energy (squared Frobenius norm) inside the protected space."""
        total = float((C.double() ** 2).sum())
        return 1.0 - float((self.residual(C) ** 2).sum()) / total if total > 0 else 1.0

    @classmethod
    def from_state(cls, d: int, basis: torch.Tensor | None, kind: str) -> DualGPM:
        """Rebuild a memory from a store's ``basis`` and ``kind``.

        Raises:
            ValueError: for an unknown kind or a basis of the wrong height.
        """
        if kind not in ("remove", "retain"):
            raise ValueError(f"unknown memory kind {kind!r}")
        if basis is not None and basis.shape[0] != d:
            raise ValueError(f"memory basis has {basis.shape[0]} rows, the layer has {d} inputs")
        mem = cls(d)
        mem.basis, mem.kind = (None if basis is None else basis.double()), kind
        return mem

    def update(self, C: torch.Tensor, eps: float) -> int:
        """Grow the protected space until it keeps at least ``eps`` of ``C``'s energy.

        Args:
            C: the layer's input covariance after training the task, ``(d, d)``.
            eps: threshold in (0, 1] (see :func:`inflora_threshold`).

        Returns:
            The number of directions added.
        """
        C = C.double()
        if C.shape != (self.d, self.d):
            raise ValueError(f"covariance has shape {tuple(C.shape)}, expected ({self.d}, {self.d})")
        total = float((C**2).sum())
        if total == 0:
            return 0
        R = self.residual(C)
        U, S, _ = torch.linalg.svd(R)
        sq = S**2
        before = self.dim
        if self.kind == "remove":
            k = _energy_count(sq, total - float((R**2).sum()), total, eps, self.d - before)
            M = U[:, :k] if self.basis is None else torch.cat([self.basis, U[:, :k]], 1)
            basis = torch.linalg.qr(M)[0] if M.shape[1] else M
            if basis.shape[1] > self.d // 2:  # store the smaller complement from now on
                basis, self.kind = complement(basis, self.d - basis.shape[1]), "retain"
            self.basis = basis
        else:
            # outside energy must fall to ≤ 1 − eps: move the top-k directions of QQᵀC into M
            basis = self.basis
            assert basis is not None  # a "retain" memory always holds its complement
            outside = float((R**2).sum())
            k = _need_removed(sq, outside, total, eps, basis.shape[1])
            if k:
                Uk = U[:, :k]
                rest = basis - Uk @ (Uk.T @ basis)
                Ur, _, _ = torch.linalg.svd(rest, full_matrices=False)
                self.basis = Ur[:, : basis.shape[1] - k]
        return self.dim - before


def _need_removed(sq: torch.Tensor, outside: float, total: float, eps: float, limit: int) -> int:
    """Smallest k with ``(outside − sum(sq[:k])) / total ≤ 1 − eps`` (retain-type update)."""
    if outside / total <= 1.0 - eps + 1e-12:
        return 0
    left = (outside - torch.cumsum(sq, 0)) / total
    ok = (left <= 1.0 - eps + 1e-12).nonzero()
    return min(int(ok[0]) + 1 if len(ok) else len(sq), limit)


def memory_tensors(memory: dict[str, DualGPM]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A store's view of per-layer memories: ``({"memory.<layer>": basis}, {layer: kind})``."""
    tensors = {f"memory.{n}": m.basis.contiguous() for n, m in memory.items() if m.basis is not None}
    return tensors, {n: m.kind for n, m in memory.items()}


def load_memories(dims: dict[str, int], tensors: dict[str, torch.Tensor], kinds: dict[str, str]) -> dict[str, DualGPM]:
    """Inverse of :func:`memory_tensors`, given each layer's input dimension.

    Raises:
        KeyError: for a layer without a recorded kind; ValueError: see :meth:`DualGPM.from_state`.
    """
    def cpu(t):  # the memory's algebra runs on the CPU whatever device the model is on
        return None if t is None else t.cpu()

    return {n: DualGPM.from_state(d, cpu(tensors.get(f"memory.{n}")), kinds[n]) for n, d in dims.items()}
