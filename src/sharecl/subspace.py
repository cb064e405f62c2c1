"""Shared linear algebra for low-rank continual learning.

Everything here is pure ``torch`` and task-agnostic: balanced (canonical) LoRA factors,
rank selection by an energy rule, and the data-free merge of Share (arXiv 2602.06043,
§"continual merging"), done in the small space spanned by the old basis and the new
task's factors (METHODS.md §1, "[ours] Merge in the small space").

Conventions (PEFT's): ``B`` is the up-projection ``(d_out, r)``, ``A`` the down-projection
``(r, d_in)``; ``ΔW = B @ A``. Linear algebra runs in float64 and is cast back by callers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sharecl.coeff_log import CoefficientLog

__all__ = [
    "balanced_factors",
    "choose_rank",
    "numerical_rank",
    "orthonormal_complement",
    "MergeGrams",
    "MergeResult",
    "merge_subspace",
    "naive_merge_subspace",
]

_F = torch.float64


def balanced_factors(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the balanced form ``(B', A')`` of a low-rank product ``B @ A``.

    ``B @ A == (B R) @ (R⁻¹ A)`` for any invertible ``R``; this picks the representative
    whose two factors carry equal singular values: thin QR of ``B`` and ``A.T``, SVD of the
    core ``R_B @ R_A.T = X S Yᵀ``, then ``B' = Q_B X S^½`` and ``A' = (Q_A Y S^½)ᵀ``.
    Columns are sorted by singular value, so ``B'[:, :p] @ A'[:p]`` is the best rank-p
    approximation of ``B @ A`` (Eckart–Young). METHODS.md §1, "[ours] Canonicalise".

    Args:
        B: ``(d_out, r)`` float tensor.
        A: ``(r, d_in)`` float tensor.

    Returns:
        ``(B', A')`` with the shapes and dtype of the inputs; ``B' @ A'`` equals ``B @ A``
        to float rounding.

    Raises:
        ValueError: if the inner dimensions differ.
    """
    if B.ndim != 2 or A.ndim != 2 or B.shape[1] != A.shape[0]:
        raise ValueError(f"balanced_factors needs B (d_out, r) and A (r, d_in); got {tuple(B.shape)} and {tuple(A.shape)}")
    b, a = _canonical_batch(B.to(_F).unsqueeze(0), A.to(_F).T.unsqueeze(0))
    return b[0].to(B.dtype), a[0].T.to(A.dtype)


def numerical_rank(s: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype = torch.float32) -> int:
    """Number of singular values above ``max(shape) · eps(dtype) · s_max``.

    The tolerance uses the eps of the dtype the factors were *stored* in (float32 by
    default), so directions that are rounding noise never enter a basis.
    """
    if s.numel() == 0 or float(s[0]) <= 0:
        return 0
    tol = max(shape) * torch.finfo(dtype).eps * float(s[0])
    return int((s > tol).sum())


def choose_rank(s: torch.Tensor, *, k: int | None, energy: float | None, k_max: int | None, rank: int) -> int:
    """Pick the basis size from singular values ``s`` (descending).

    Either a fixed ``k`` or the smallest k whose ``Σ_{j<k} s_j² / Σ s_j²`` reaches
    ``energy``; capped by ``k_max`` and by the numerical ``rank`` (no null-space padding).

    Raises:
        ValueError: if neither or both of ``k`` and ``energy`` are given, or they are out of range.
    """
    if (k is None) == (energy is None):
        raise ValueError("give exactly one of k (fixed basis size) or energy (fraction in (0, 1])")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        chosen = k
    else:
        assert energy is not None  # exactly one of the two is given (checked above)
        if not 0 < energy <= 1:
            raise ValueError(f"energy must be in (0, 1], got {energy}")
        e = s.to(_F) ** 2
        cum = torch.cumsum(e, 0) / e.sum().clamp_min(torch.finfo(_F).tiny)
        chosen = int((cum < energy - 1e-12).sum()) + 1
    if k_max is not None:
        chosen = min(chosen, k_max)
    return max(0, min(chosen, rank))


def orthonormal_complement(basis: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random orthonormal columns orthogonal to the columns of ``basis`` ``(d, k)``.

    Returns a ``(d, n)`` tensor in ``basis.dtype``. Used to start Share's temporary
    directions ``U⁺``, ``V⁺`` outside the current subspace (METHODS.md §1, [ours]).

    Raises:
        ValueError: if ``k + n > d``.
    """
    d, k = basis.shape
    if k + n > d:
        raise ValueError(f"cannot find {n} directions orthogonal to a rank-{k} basis in dimension {d}")
    g = torch.randn(d, n, generator=generator, dtype=_F).to(basis.device)  # CPU draw: same numbers on every device
    b = basis.to(_F)
    for _ in range(2):  # project twice for numerical orthogonality
        g = g - b @ (b.T @ g)
    q, _ = torch.linalg.qr(g)
    return q.to(basis.dtype)


@dataclass
class MergeGrams:
    """What a merge needs of the old tasks besides their coefficients, kept between merges so a
    merge need not recompute it: ``B`` / ``A`` the ``(k, k)`` Gram ``Σ_i C[i] C[i]ᵀ`` of all tasks'
    coefficients per side, ``tasks_B`` / ``tasks_A`` every task's ``C[i]ᵀ C[i]`` ``(T, p, p)``.
    Float64; None where unknown."""

    B: torch.Tensor | None
    A: torch.Tensor | None
    tasks_B: torch.Tensor | None
    tasks_A: torch.Tensor | None

    @staticmethod
    def side(coeff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ_i C[i] C[i]ᵀ (k, k), C[i]ᵀ C[i] (T, p, p))`` of coefficients ``(T, k, p)``, float64."""
        c = coeff.to(_F)
        return torch.einsum("tkp,tlp->kl", c, c), _gram(c)

    @classmethod
    def of(cls, coeff_B: torch.Tensor, coeff_A: torch.Tensor) -> MergeGrams:
        """Computed from every task's coefficients (one pass over them)."""
        (gB, tB), (gA, tA) = cls.side(coeff_B), cls.side(coeff_A)
        return cls(gB, gA, tB, tA)


@dataclass
class MergeResult:
    """Output of a Share merge for one adapted layer.

    Attributes:
        U: new output basis ``(d_out, k_B)``, orthonormal columns, float64.
        V: new input basis ``(d_in, k_A)``, orthonormal columns, float64.
        coeff_B: ``(T, k_B, p)`` coefficients of every task (old ones re-projected, new last).
        coeff_A: ``(T, k_A, p)``.
        drift: ``(T,)`` relative Frobenius change ``‖ΔW_i' − ΔW_i‖ / ‖ΔW_i‖`` of each task
            caused by the truncation (0 for a task whose ΔW is 0).
        energy_B, energy_A: fraction of the stack's squared Frobenius norm the bases keep.
        truncation: the new task's own loss from keeping ``p`` of its ``r`` directions,
            ``‖ΔW_t − ΔW_t^(p)‖_F / ‖ΔW_t‖_F`` (0 when ``r ≤ p``, or for a zero ``ΔW_t``);
            ``drift[-1]`` is what the basis then costs its rank-p part.
        change_B, change_A: ``(k_B', k_B)`` / ``(k_A', k_A)`` changes of basis of the old tasks'
            coefficients, ``coeff_B[i] = change_B @ old coeff_B[i]`` (``U'ᵀ U``; a store can keep
            old coefficients as written and replay these, :mod:`sharecl.store`).
        grams: the Gram matrices of every task after this merge, for the next one.
    """

    U: torch.Tensor
    V: torch.Tensor
    coeff_B: torch.Tensor
    coeff_A: torch.Tensor
    drift: torch.Tensor
    energy_B: float
    energy_A: float
    truncation: float = 0.0
    change_B: torch.Tensor | None = None
    change_A: torch.Tensor | None = None
    grams: MergeGrams | None = None


def _canonical_batch(b: torch.Tensor, a: torch.Tensor, p: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Balance a batch of factor pairs given column-wise, ``b`` (T, m, r) and ``a`` (T, n, r).

    Returns ``p`` columns per side (default ``r``): the top-p balanced columns, padded with
    zero columns when the pair has fewer (rank below p, or fewer rows than columns).
    """
    p = b.shape[2] if p is None else p
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a)
    x, s, yh = torch.linalg.svd(rb @ ra.transpose(1, 2), full_matrices=False)
    root = s.clamp_min(0).sqrt().unsqueeze(1)
    nb, na = ((qb @ x) * root)[:, :, :p], ((qa @ yh.transpose(1, 2)) * root)[:, :, :p]
    if nb.shape[2] < p:
        nb = torch.nn.functional.pad(nb, (0, p - nb.shape[2]))
        na = torch.nn.functional.pad(na, (0, p - na.shape[2]))
    return nb, na


def _gram(x: torch.Tensor) -> torch.Tensor:
    """Per-task Gram matrices ``(T, p, p)`` of per-task coefficients ``x`` (T, m, p)."""
    return x.transpose(1, 2) @ x


def _drift(gcb: torch.Tensor, gca: torch.Tensor, gyb: torch.Tensor, gya: torch.Tensor) -> torch.Tensor:
    """Relative Frobenius change of every task when its factors are projected onto new bases.

    Per task, in an orthonormal coordinate system split into the new basis and its complement,
    ``gcb = cbᵀ cb`` / ``gca`` (T, p, p) are the Gram matrices of the coordinates inside the new
    bases and ``gyb`` / ``gya`` those of the coordinates in the complements (what the truncation
    drops). With ``b = (cb, yb)``, ``b aᵀ − P_B b aᵀ P_A = cb yaᵀ + yb caᵀ + yb yaᵀ`` (three
    mutually orthogonal terms), and ``‖x yᵀ‖_F² = Σ (xᵀx) ⊙ (yᵀy)``. The dropped terms come from
    their own small residuals, so a drift of 1e-16 reads as such (no cancellation).
    """
    def dot(x, y):  # per task Σ x ⊙ y, without a (T, p, p) temporary
        return torch.einsum("tij,tij->t", x, y)

    num = dot(gcb, gya) + dot(gyb, gca) + dot(gyb, gya)
    den = num + dot(gcb, gca)
    return torch.where(den > 0, (num.clamp_min(0) / den.clamp_min(torch.finfo(_F).tiny)).sqrt(), torch.zeros_like(den))


def _left_singular(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors ``(m, min(m, n))`` and singular values (descending) of ``x`` (m, n)."""
    w, s, _ = torch.linalg.svd(x, full_matrices=False)
    return w, s


def _from_gram(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left singular vectors and singular values (descending) of a matrix given its Gram
    ``x xᵀ`` (m, m). In float64 this resolves singular values down to about 1e-7 of the
    largest, far below the numerical-rank tolerance (:func:`numerical_rank`)."""
    evals, evecs = torch.linalg.eigh(gram)
    return evecs.flip(1), evals.flip(0).clamp_min(0).sqrt()


def _choose_basis(w, s, s_full, shape, tail, k, energy, k_max, store_dtype):
    """One side's basis ``W (m, k')`` from the stored tasks' left singular vectors ``w`` and
    values ``s``, the singular values ``s_full`` of the whole stack ``[stored, tail]`` of shape
    ``shape``, and the new task's directions beyond p, ``tail`` (m, r − p).

    The rank rule (:func:`choose_rank`) runs on the whole stack (METHODS.md §1: the basis is
    built from the new task's full factors). [ours] The directions are taken stored-first: the
    top singular vectors of the stored columns, then, in whatever room the rule leaves, the top
    directions of ``tail`` outside them. So a seed task of rank r puts all r directions in the
    basis, while a newcomer's unstored tail never pushes out a direction a task keeps: old tasks
    drift only as much as a p-column stack alone would make them.

    Returns ``(W, n_extra)``: ``W`` is ``w``'s leading columns followed by ``n_extra`` from ``tail``.
    """
    kk = choose_rank(s_full, k=k, energy=energy, k_max=k_max, rank=numerical_rank(s_full, shape, store_dtype))
    stored_shape = (shape[0], shape[1] - tail.shape[1])
    W = w[:, : min(kk, numerical_rank(s, stored_shape, store_dtype))]
    if kk > W.shape[1] and tail.shape[1]:
        rest = tail - W @ (W.T @ tail)
        w2, s2, _ = torch.linalg.svd(rest, full_matrices=False)
        tol = max(shape) * torch.finfo(store_dtype).eps * float(s_full[0])
        extra = w2[:, : min(kk - W.shape[1], int((s2 > tol).sum()))]
        extra = torch.linalg.qr(extra - W @ (W.T @ extra))[0]  # orthogonal to W to rounding
        return torch.cat([W, extra], 1), extra.shape[1]
    return W, 0


def merge_subspace(
    U: torch.Tensor | None,
    V: torch.Tensor | None,
    coeff_B: torch.Tensor | CoefficientLog | None,
    coeff_A: torch.Tensor | CoefficientLog | None,
    new_B: torch.Tensor,
    new_A: torch.Tensor,
    *,
    p: int,
    k: int | None = None,
    energy: float | None = None,
    k_max: int | None = None,
    store_dtype: torch.dtype = torch.float32,
    grams: MergeGrams | None = None,
    reproject: bool = True,
    center: bool = False,
) -> MergeResult:
    """Share's data-free merge of one new task into one layer's subspace, in the small space.

    Every old task ``i`` is ``B_i = U @ coeff_B[i]``, ``A_i.T = V @ coeff_A[i]``; the new
    task is ``(new_B, new_A)``, balanced (:func:`balanced_factors`). The old tasks' factors
    and **all r** balanced columns of the new task are stacked side by side, truncated to the
    top-k singular vectors per side, and every task is re-projected; the new task's
    coefficients keep its best rank-p part (METHODS.md §1, "Merging after task t" and "The new
    task's own truncation"), and what that cut loses is :attr:`MergeResult.truncation`. The
    basis takes the stored (rank-p) columns first and the new task's further directions only in
    the room the rank rule leaves ([ours], see :func:`_choose_basis`).
    Because old tasks lie in ``span(U)``, the B-stack lies in
    ``span([U, new_B])``: one thin QR of that ``(d_out, k + r)`` matrix gives coordinates in
    which the whole stack is a ``(k + r, T_old·p + r)`` matrix; likewise for A. With many tasks
    the basis comes from that stack's ``(k + r)²`` Gram matrix, and every old task's new
    coefficients and dropped residual come from one product with a ``(k + r, k)`` matrix (see
    :func:`_merge_side`). Cost ``O(d·(k+r)² + T·p·k·(k+r))``, independent of ``d·T``.

    Args:
        U: ``(d_out, k_B)`` orthonormal, or None when the subspace is empty.
        V: ``(d_in, k_A)`` orthonormal, or None.
        coeff_B: ``(T_old, k_B, p)``, or a :class:`~sharecl.coeff_log.CoefficientLog` holding them
            (read through the map onto the dropped directions only, never materialised, on the
            Gram path with ``grams`` given and ``reproject=False``), or None.
        coeff_A: ``(T_old, k_A, p)``, a coefficient log, or None.
        new_B: ``(d_out, r)`` the new task's up-projection (any r ≥ 1).
        new_A: ``(r, d_in)`` the new task's down-projection.
        p: pseudo-rank kept per task; the new task's coefficients keep its best rank-p part.
        k: fixed basis size per side (the rank rule of :func:`choose_rank`), or None.
        energy: kept fraction of the squared norm under :func:`choose_rank`'s energy rule, or None.
        k_max: cap on k under the energy rule.
        store_dtype: dtype the factors are stored in; sets the numerical-rank tolerance.
        grams: the old tasks' Gram matrices as the previous merge returned them
            (:attr:`MergeResult.grams`); computed from the coefficients when None.
        center: take the basis from the mean-centred stack, as the authors' code does, while the
            coefficients are still projections of the uncentred factors (METHODS.md §1: kept only
            for comparison; the uncentred basis is the best rank-k fit, Eckart–Young).
        reproject: False: return only the new task's coefficients (``coeff_B`` ``(1, k', p)``);
            the caller re-expresses old tasks with ``change_B`` / ``change_A`` (a coefficient
            log, :mod:`sharecl.coeff_log`). With ``grams`` given, the merge then reads each old
            task's coefficients once, through a ``(k + r − k', k)`` matrix (their dropped part).

    Returns:
        :class:`MergeResult` (float64 tensors).
    """
    r = new_B.shape[1]
    if new_A.shape[0] != r:
        raise ValueError(f"new_B {tuple(new_B.shape)} and new_A {tuple(new_A.shape)} disagree on the rank")
    nb, na = new_B.to(_F), new_A.to(_F).T  # (d_out, r), (d_in, r)
    d_out, d_in = nb.shape[0], na.shape[0]
    if U is None:
        U = nb.new_zeros(d_out, 0)
        V = na.new_zeros(d_in, 0)
        coeff_B = nb.new_zeros(0, 0, p)
        coeff_A = na.new_zeros(0, 0, p)
    assert V is not None and coeff_B is not None and coeff_A is not None, "an old basis comes with V and its tasks' coefficients"
    U, V, cB, cA = U.to(_F), V.to(_F), coeff_B, coeff_A  # coefficients: read where needed (_full / _left)
    kb, ka = U.shape[1], V.shape[1]

    qb, rb = torch.linalg.qr(torch.cat([U, nb], 1))  # (d_out, kb + r)
    qa, ra = torch.linalg.qr(torch.cat([V, na], 1))
    # old tasks were balanced when they were new; only the new task is canonicalised (METHODS.md §1)
    full_b, full_a = _canonical_batch(rb[:, kb:].unsqueeze(0), ra[:, ka:].unsqueeze(0), max(r, p))
    g = grams or MergeGrams(None, None, None, None)
    sides = [_merge_side(rb[:, :kb], cB, full_b[0], p, k, energy, k_max, store_dtype, gram=g.B, task_grams=g.tasks_B,
                         reproject=reproject, center=center),
             _merge_side(ra[:, :ka], cA, full_a[0], p, k, energy, k_max, store_dtype, gram=g.A, task_grams=g.tasks_A,
                         reproject=reproject, center=center)]
    return _result(qb, qa, sides, full_b[0], full_a[0], p)


def _merge_side(L, C, full, p, k, energy, k_max, store_dtype, dense=False, gram=None, task_grams=None, reproject=True,
                center=False):
    """One side of the merge in a coordinate system of dimension m.

    ``L`` (m, k_old) has orthonormal columns: the old basis in these coordinates, so old task i
    is ``L @ C[i]`` with ``C`` (T_old, k_old, p); ``full`` (m, r') holds the new task's balanced
    columns by singular value. The stored stack is ``[L C_1 … L C_T, full[:, :p]]``; with many
    tasks its left singular vectors come from its ``(m, m)`` Gram matrix ``L G Lᵀ + n nᵀ``,
    ``G = Σ_i C_i C_iᵀ`` (``gram``, or one product over ``C``; no ``(m, T·p)`` stack is formed),
    with few (or ``dense``) from an SVD of the stack itself. ``task_grams`` ``(T_old, p, p)``
    are the old tasks' ``C_iᵀ C_i`` (computed when None). ``center``: the basis comes from the
    stacks minus their column means (the authors' code), the coefficients from the uncentred stack.

    Returns a dict: ``W`` (m, k'), ``R = Wᵀ L`` (k', k_old, the change of basis of old
    coefficients), ``coeff`` (T+1, k', p) (only the new task's (1, k', p) without
    ``reproject``), per-task Grams ``g_coeff`` / ``g_resid`` (T+1, p, p) of every task's part
    inside ``W`` and outside it (what the truncation drops), the new ``gram`` (k', k') and the
    kept energy.
    """
    T, m = _count(C), L.shape[0]
    new, tail = full[:, :p], full[:, p:]
    shape = (m, T * p + full.shape[1])
    if gram is None or task_grams is None or center or reproject or dense or T * p + p <= 2 * m:
        C = _full(C)  # every task's coefficients, float64; otherwise they are read once, through _left
    if gram is None or task_grams is None:
        gram, task_grams = MergeGrams.side(C)
    stack_gram = L @ gram @ L.T + new @ new.T  # of the stored stack [L C_1 … L C_T, new]
    if dense or T * p + p <= 2 * m:
        stored = torch.cat([L @ _wide(C), new], 1)
        both = torch.cat([stored, tail], 1)
        if center:
            stored, both = stored - stored.mean(1, keepdim=True), both - both.mean(1, keepdim=True)
        w, s = _left_singular(stored)
        s_full = _left_singular(both)[1] if tail.shape[1] or center else s
    else:
        S, S_full = stack_gram, stack_gram + tail @ tail.T
        if center:  # X Xᵀ − N μ μᵀ with μ the mean column: the Gram of the centred stack
            total = L @ C.sum((0, 2)) + new.sum(1)
            both = total + tail.sum(1)
            S = S - torch.outer(total, total) / (T * p + p)
            S_full = S_full - torch.outer(both, both) / (T * p + p + tail.shape[1])
        w, s = _from_gram(S)
        s_full = torch.linalg.eigvalsh(S_full).flip(0).clamp_min(0).sqrt() if tail.shape[1] else s
    W, n_extra = _choose_basis(w, s, s_full, shape, tail, k, energy, k_max, store_dtype)
    total = float(torch.trace(stack_gram))
    kept = float(torch.trace(W.T @ stack_gram @ W)) / total if total > 0 else 1.0
    kk = W.shape[1]
    if w.shape == (m, m) and not n_extra:  # W = the leading k' columns of a full eigenbasis
        Wc = w[:, kk:]  # (m, m − k'): its complement, already orthonormal
    else:
        Wc = torch.linalg.qr(W, mode="complete")[0][:, kk:]
    R = W.T @ L
    c_new, y_new = W.T @ new, Wc.T @ new
    if reproject:
        coords = (torch.cat([W, Wc], 1).T @ L) @ C  # (T, m, p)
        coeff = torch.cat([coords[:, :kk], c_new[None]], 0)
        g_resid = torch.cat([_gram(coords[:, kk:]), (y_new.T @ y_new)[None]], 0)
        g_coeff = torch.cat([_gram(coeff[:-1]), (c_new.T @ c_new)[None]], 0)
    else:
        coeff = c_new[None]
        resid = _left(C, Wc.T @ L)  # only the dropped part: (T, m − k', p)
        g_resid, g_coeff = resid.new_empty(T + 1, p, p), resid.new_empty(T + 1, p, p)
        torch.bmm(resid.transpose(1, 2), resid, out=g_resid[:T])
        torch.sub(task_grams, g_resid[:T], out=g_coeff[:T])  # ‖C_i‖-Gram splits exactly into the parts inside and outside W
        g_resid[T], g_coeff[T] = y_new.T @ y_new, c_new.T @ c_new
    return {"W": W, "R": R, "coeff": coeff, "kept": kept, "g_coeff": g_coeff, "g_resid": g_resid,
            "gram": R @ gram @ R.T + c_new @ c_new.T}


def _result(qb, qa, sides, full_b, full_a, p) -> MergeResult:
    b, a = sides
    s2 = (torch.linalg.vector_norm(full_b, dim=0) * torch.linalg.vector_norm(full_a, dim=0)) ** 2  # σ_j² of ΔW_t
    total = float(s2.sum())
    cut = float(s2[p:].sum() / total) ** 0.5 if total > 0 else 0.0
    drift = _drift(b["g_coeff"], a["g_coeff"], b["g_resid"], a["g_resid"])
    grams = MergeGrams(b["gram"], a["gram"], b["g_coeff"], a["g_coeff"])
    return MergeResult(qb @ b["W"], qa @ a["W"], b["coeff"], a["coeff"], drift, b["kept"], a["kept"], cut,
                       change_B=b["R"], change_A=a["R"], grams=grams)


def _count(coeff) -> int:
    """Tasks in ``coeff``: a ``(T, k, p)`` tensor or a :class:`~sharecl.coeff_log.CoefficientLog`."""
    return coeff.num_tasks if hasattr(coeff, "left_multiply") else coeff.shape[0]


def _full(coeff) -> torch.Tensor:
    """Every task's coefficients ``(T, k, p)`` float64, from a tensor or a coefficient log (as the
    layer holds them: materialised in the log's dtype, then widened)."""
    return (coeff.materialize() if hasattr(coeff, "left_multiply") else coeff).to(_F)


def _left(coeff, M: torch.Tensor) -> torch.Tensor:
    """``M @ C_i`` for every task ``(T, q, p)`` float64; a coefficient log never materialises ``C``."""
    return coeff.left_multiply(M) if hasattr(coeff, "left_multiply") else M @ coeff.to(_F)


def _wide(coeff: torch.Tensor) -> torch.Tensor:
    """Per-task coefficients ``(T, k, p)`` side by side: ``(k, T·p)``, task t in columns t·p … t·p+p−1."""
    T, k, p = coeff.shape
    return coeff.permute(1, 0, 2).reshape(k, T * p)


def naive_merge_subspace(U, V, coeff_B, coeff_A, new_B, new_A, *, p, k=None, energy=None, k_max=None,
                         store_dtype: torch.dtype = torch.float32, center: bool = False) -> MergeResult:
    """Reference merge: reconstruct every task in full ``(d, p)`` and SVD the ``(d, T·p)`` stack.

    Same contract as :func:`merge_subspace`; exists for tests and for the merge benchmark.
    """
    r = new_B.shape[1]
    fb, fa = _canonical_batch(new_B.to(_F).unsqueeze(0), new_A.to(_F).T.unsqueeze(0), max(r, p))
    fb, fa = fb[0], fa[0]
    if U is None:
        U, V = fb.new_zeros(fb.shape[0], 0), fa.new_zeros(fa.shape[0], 0)
        coeff_B = coeff_A = fb.new_zeros(0, 0, p)
    U, V, cB, cA = U.to(_F), V.to(_F), coeff_B.to(_F), coeff_A.to(_F)
    sides = [_merge_side(U, cB, fb, p, k, energy, k_max, store_dtype, dense=True, center=center),
             _merge_side(V, cA, fa, p, k, energy, k_max, store_dtype, dense=True, center=center)]
    res = _result(torch.eye(fb.shape[0], dtype=_F), torch.eye(fa.shape[0], dtype=_F), sides, fb, fa, p)
    # drift from the dense products themselves, task by task
    before = [U @ cB[i] @ (V @ cA[i]).T for i in range(cB.shape[0])] + [fb[:, :p] @ fa[:, :p].T]
    after = [res.U @ res.coeff_B[i] @ (res.V @ res.coeff_A[i]).T for i in range(len(before))]
    res.drift = torch.tensor([float((a - b).norm() / b.norm()) if b.norm() > 0 else 0.0 for a, b in zip(after, before)],
                             dtype=_F)
    return res
