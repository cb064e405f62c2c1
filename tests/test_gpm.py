"""DualGPM memory and InfLoRA's threshold schedule (sharecl.gpm)."""

import pytest
import torch

from sharecl.gpm import DualGPM, complement, inflora_threshold, top_directions


def _cov(d, rank, seed):
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(d, rank, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, rank, dtype=torch.float64)
    return H @ H.T / rank


def test_threshold_rises_linearly_to_one_and_is_fixed_when_open_ended():
    assert inflora_threshold(0.95, 0, 10) == pytest.approx(0.95)
    assert inflora_threshold(0.95, 9, 10) == pytest.approx(0.995)
    assert inflora_threshold(0.9, 3, None) == 0.9
    with pytest.raises(ValueError, match="eps"):
        inflora_threshold(1.5, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        inflora_threshold(0.9, 3, 3)


@pytest.mark.parametrize("eps", [0.5, 0.9, 0.99])
def test_memory_keeps_at_least_eps_of_each_task_energy(eps):
    mem = DualGPM(24)
    for seed in range(5):  # enough tasks to pass d/2 and switch to the complement
        C = _cov(24, 10, seed)
        mem.update(C, eps)
        assert mem.kept_energy(C) >= eps - 1e-9
        M = mem.protected()
        assert torch.allclose(M.T @ M, torch.eye(M.shape[1], dtype=torch.float64), atol=1e-10)
    assert mem.kind == ("retain" if mem.dim > 12 else "remove")


def test_memory_is_minimal_one_direction_fewer_misses_eps():
    mem = DualGPM(16)
    C = _cov(16, 8, 0)
    mem.update(C, 0.9)
    U, S, _ = torch.linalg.svd(C)
    k = mem.dim
    assert (S[: k - 1] ** 2).sum() / (S**2).sum() < 0.9 <= (S[:k] ** 2).sum() / (S**2).sum() + 1e-12


def test_switch_to_complement_keeps_the_same_protected_space():
    mem = DualGPM(10)
    mem.update(_cov(10, 10, 1), 0.999)
    assert mem.kind == "retain" and mem.basis.shape[1] == 10 - mem.dim
    M, Q = mem.protected(), mem.basis
    assert torch.allclose(M @ M.T + Q @ Q.T, torch.eye(10, dtype=torch.float64), atol=1e-10)


def test_top_directions_avoid_the_excluded_space_even_when_rank_deficient():
    ex = complement(torch.zeros(12, 0, dtype=torch.float64), 5)
    C = _cov(12, 2, 3)
    X = top_directions(C - ex @ (ex.T @ C), 4, exclude=ex)
    assert X.shape == (12, 4)
    assert torch.allclose(X.T @ X, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert (ex.T @ X).abs().max() < 1e-10
