"""Property tests for the subspace maths (METHODS.md §1)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharecl.subspace import balanced_factors, choose_rank, merge_subspace, naive_merge_subspace, orthonormal_complement


def rand_lora(d_out, d_in, r, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_out, r, generator=g, dtype=torch.float64) * scale,
            torch.randn(r, d_in, generator=g, dtype=torch.float64) / scale)


@settings(max_examples=40, deadline=None)
@given(d_out=st.integers(4, 40), d_in=st.integers(4, 40), r=st.integers(1, 6), seed=st.integers(0, 10_000),
       scale=st.floats(1e-3, 1e3))
def test_balanced_factors_reproduce_product_exactly(d_out, d_in, r, seed, scale):
    B, A = rand_lora(d_out, d_in, r, seed, scale)
    Bb, Ab = balanced_factors(B, A)
    assert torch.allclose(Bb @ Ab, B @ A, atol=1e-9 * (B @ A).abs().max().item() + 1e-12)
    # balanced: both factors carry the same column norms, sorted descending
    nb, na = Bb.norm(dim=0), Ab.norm(dim=1)
    assert torch.allclose(nb, na, rtol=1e-8, atol=1e-10)
    assert torch.all(nb[:-1] >= nb[1:] - 1e-9)


def test_balanced_factors_do_not_depend_on_factor_scaling():
    B, A = rand_lora(20, 30, 4, 1)
    R = torch.randn(4, 4, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    b1, a1 = balanced_factors(B, A)
    b2, a2 = balanced_factors(B @ R, torch.linalg.solve(R, A))
    # identical up to the sign of each column pair
    sign = torch.sign((b1 * b2).sum(0))
    assert torch.allclose(b1, b2 * sign, atol=1e-8) and torch.allclose(a1, a2 * sign[:, None], atol=1e-8)


def test_choose_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert choose_rank(s, k=3, energy=None, k_max=None, rank=4) == 3
    assert choose_rank(s, k=10, energy=None, k_max=None, rank=4) == 4  # never pad past the rank
    assert choose_rank(s, k=None, energy=0.76, k_max=None, rank=4) == 2  # 16/21.25 = 0.753 < 0.76
    assert choose_rank(s, k=None, energy=0.75, k_max=None, rank=4) == 1
    assert choose_rank(s, k=None, energy=0.99, k_max=2, rank=4) == 2
    with pytest.raises(ValueError):
        choose_rank(s, k=2, energy=0.5, k_max=None, rank=4)


def _stack_merges(T, d_out, d_in, r, p, k, seed, merge=merge_subspace):
    U = V = cB = cA = None
    tasks = []
    for t in range(T):
        B, A = rand_lora(d_out, d_in, r, seed + t)
        tasks.append((B, A))
        res = merge(U, V, cB, cA, B, A, p=p, k=k)
        U, V, cB, cA = res.U, res.V, res.coeff_B, res.coeff_A
    return res, tasks


def test_reprojection_changes_nothing_without_truncation():
    p = 3
    res, tasks = _stack_merges(4, 30, 25, p, p, 4 * p, 0)
    assert torch.all(res.drift < 1e-10)
    for t, (B, A) in enumerate(tasks):
        got = res.U @ res.coeff_B[t] @ res.coeff_A[t].T @ res.V.T
        assert torch.allclose(got, B @ A, atol=1e-9)
    assert torch.allclose(res.U.T @ res.U, torch.eye(res.U.shape[1], dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("k,T", [(2, 5), (5, 5), (9, 5), (5, 14), (9, 14)])
def test_small_space_merge_equals_naive_merge(k, T):
    """T = 14 takes the small-space merge through its Gram-matrix path (T·p > 2(k + r)); the
    reference always takes an SVD of the dense (d, T·p) stack and measures drift on dense ΔW."""
    small, _ = _stack_merges(T, 40, 33, 4, 3, k, 7)
    naive, _ = _stack_merges(T, 40, 33, 4, 3, k, 7, merge=naive_merge_subspace)
    assert small.U.shape == naive.U.shape
    assert torch.allclose(small.U @ small.U.T, naive.U @ naive.U.T, atol=1e-8)  # same subspace
    assert torch.allclose(small.V @ small.V.T, naive.V @ naive.V.T, atol=1e-8)
    for t in range(T):
        ds = small.U @ small.coeff_B[t] @ small.coeff_A[t].T @ small.V.T
        dn = naive.U @ naive.coeff_B[t] @ naive.coeff_A[t].T @ naive.V.T
        assert torch.allclose(ds, dn, atol=1e-8)
    assert torch.allclose(small.drift, naive.drift, atol=1e-8)
    assert small.drift[:-1].max() > 0  # k < T·p truncates, so old tasks drift
    assert abs(small.energy_B - naive.energy_B) < 1e-9 and abs(small.energy_A - naive.energy_A) < 1e-9


def test_change_of_basis_replays_the_reprojection():
    """``change_B @ old coefficients`` is what the merge made of every old task."""
    before, _ = _stack_merges(13, 40, 33, 4, 3, 6, 2)
    B, A = rand_lora(40, 33, 4, 99)
    after = merge_subspace(before.U, before.V, before.coeff_B, before.coeff_A, B, A, p=3, k=6)
    assert torch.allclose(after.change_B @ before.coeff_B, after.coeff_B[:-1], atol=1e-12)
    assert torch.allclose(after.change_A @ before.coeff_A, after.coeff_A[:-1], atol=1e-12)
    assert torch.allclose(after.change_B, after.U.T @ before.U, atol=1e-10)  # U'ᵀ U, independently


def test_truncation_drift_is_reported_exactly():
    res, tasks = _stack_merges(3, 20, 20, 2, 2, 3, 3)
    for t, (B, A) in enumerate(tasks[-1:], start=2):  # the newest task: its rank-2 LoRA vs its reconstruction
        got = res.U @ res.coeff_B[t] @ res.coeff_A[t].T @ res.V.T
        rel = ((got - B @ A).norm() / (B @ A).norm()).item()
        assert abs(rel - res.drift[t].item()) < 1e-9


def test_no_null_space_padding():
    B, A = rand_lora(30, 30, 2, 0)
    res = merge_subspace(None, None, None, None, B, A, p=2, k=16)
    assert res.U.shape[1] == 2 and res.V.shape[1] == 2


def test_orthonormal_complement():
    U = torch.linalg.qr(torch.randn(20, 5, dtype=torch.float64))[0]
    C = orthonormal_complement(U, 3, torch.Generator().manual_seed(0))
    assert torch.allclose(C.T @ C, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert (U.T @ C).abs().max() < 1e-12
    with pytest.raises(ValueError):
        orthonormal_complement(U, 16)


@pytest.mark.parametrize("merge", [merge_subspace, naive_merge_subspace], ids=["small-space", "naive"])
def test_a_rank_r_task_builds_the_basis_from_all_its_directions_and_records_its_own_cut(merge):
    """METHODS.md §1, "The new task's own truncation": a rank-6 seed with p = 2 puts all six
    directions in the basis, stores its best rank-2 part, and reports what the cut loses; checked
    against a dense SVD of ``B @ A`` (Eckart–Young), not against the merge's own algebra."""
    B, A = rand_lora(40, 33, 6, 3)
    res = merge(None, None, None, None, B, A, p=2, k=16)
    assert res.U.shape[1] == 6 and res.V.shape[1] == 6  # not 2: the whole task spans the basis
    assert (B - res.U @ (res.U.T @ B)).norm() < 1e-9 * B.norm()
    assert res.coeff_B.shape == (1, 6, 2) and res.coeff_A.shape == (1, 6, 2)
    X, s, Yh = torch.linalg.svd(B @ A)
    best2 = X[:, :2] @ torch.diag(s[:2]) @ Yh[:2]
    stored = res.U @ res.coeff_B[0] @ res.coeff_A[0].T @ res.V.T
    assert torch.allclose(stored, best2, atol=1e-9 * best2.abs().max().item())
    assert abs(res.truncation - ((s[2:] ** 2).sum() / (s**2).sum()).sqrt().item()) < 1e-12
    assert res.drift[-1] < 1e-12  # the rank-2 part itself is exactly in the basis
    # a task of rank ≤ p loses nothing of its own
    B2, A2 = rand_lora(40, 33, 2, 4)
    assert merge(None, None, None, None, B2, A2, p=2, k=16).truncation == 0.0
    # folded into an existing basis: old tasks untouched while k holds everything, the new one cut
    B5, A5 = rand_lora(40, 33, 5, 5)
    nxt = merge(res.U, res.V, res.coeff_B, res.coeff_A, B5, A5, p=2, k=16)
    assert nxt.U.shape[1] == 2 + 5  # the seed is stored at p = 2 now; the newcomer brings all five
    assert nxt.drift[0] < 1e-9 and nxt.truncation > 0.1
    # with no spare room the newcomer's unstored tail never displaces a stored direction
    tight = merge(res.U, res.V, res.coeff_B, res.coeff_A, B5, A5, p=2, k=4)
    assert tight.U.shape[1] == 4 and tight.drift.max() < 1e-9


@pytest.mark.parametrize("T", [3, 14])  # T = 14: the Gram-matrix path
def test_a_centred_basis_depends_on_arbitrary_factor_signs_and_fits_worse(T):
    """``center=True`` (the authors' code, METHODS.md §1) subtracts the stack's mean column
    before the SVD. Each balanced factor column pair has an arbitrary sign (``B[:, j], A[j]`` and
    ``−B[:, j], −A[j]`` give the same ΔW; an SVD picks one by its own conventions), and the mean
    moves with it: the same merge computed in two coordinate systems (the small space, and the
    full space of the reference merge) gives two different centred bases, while the uncentred
    bases agree. By Eckart–Young the uncentred basis also keeps at least as much of the stack."""
    g = torch.Generator().manual_seed(5)
    common = torch.randn(40, 1, generator=g, dtype=torch.float64) * 3  # every task shares one direction
    U = V = cB = cA = None
    for _ in range(T):
        B = common + 0.3 * torch.randn(40, 2, generator=g, dtype=torch.float64)
        A = torch.randn(2, 33, generator=g, dtype=torch.float64)
        res = merge_subspace(U, V, cB, cA, B, A, p=2, k=3)
        U, V, cB, cA = res.U, res.V, res.coeff_B, res.coeff_A
    B = common + 0.3 * torch.randn(40, 2, generator=g, dtype=torch.float64)
    A = torch.randn(2, 33, generator=g, dtype=torch.float64)
    runs = {(merge, center): merge(U, V, cB, cA, B, A, p=2, k=3, center=center)
            for merge in (merge_subspace, naive_merge_subspace) for center in (False, True)}
    proj = {key: r.U @ r.U.T for key, r in runs.items()}
    assert torch.allclose(proj[merge_subspace, False], proj[naive_merge_subspace, False], atol=1e-8)
    assert (proj[merge_subspace, True] - proj[naive_merge_subspace, True]).abs().max() > 1e-3
    assert runs[merge_subspace, False].energy_B >= runs[merge_subspace, True].energy_B - 1e-12
