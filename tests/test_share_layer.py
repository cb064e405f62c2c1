"""ShareLinear: folding, mixed-task batches, initialisation (METHODS.md §1 "Inference")."""

import torch
from torch import nn

from sharecl.adapters.share import ShareLinear
from sharecl.subspace import merge_subspace


def layer_with_tasks(T=4, d_in=24, d_out=20, p=2, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    layer = ShareLinear(base, scaling=1.5, p=p)
    for _ in range(T):
        B, A = torch.randn(d_out, p, generator=g), torch.randn(p, d_in, generator=g)
        has = layer.num_tasks > 0
        layer.apply_merge(merge_subspace(layer.U if has else None, layer.V if has else None, layer.coeff_B if has else None,
                                         layer.coeff_A if has else None, B, A, p=p, k=k))
    return layer


def test_fold_equals_adapter_forward():
    layer = layer_with_tasks()
    x = torch.randn(3, 5, 24)
    for t in range(layer.num_tasks):
        with layer.router.use(task_index=t):
            want = layer(x)
        got = layer.folded_linear(t)(x)
        assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(layer(x), layer.base(x))  # outside any route: the base layer


def test_mixed_task_forward_equals_per_task_forwards():
    layer = layer_with_tasks()
    x = torch.randn(6, 7, 24)
    rows = torch.tensor([2, 0, 3, 3, 1, 0])
    with layer.router.use(row_tasks=rows):
        mixed = layer(x)
    for i, t in enumerate(rows.tolist()):
        with layer.router.use(task_index=t):
            assert torch.allclose(mixed[i], layer(x[i: i + 1])[0], atol=1e-5)


def _applied_update(layer, t):
    """``ΔW_t`` as the adapter's forward applies it: ``layer(I) − base(I)`` under task t, transposed."""
    eye = torch.eye(layer.base.in_features)
    with layer.router.use(task_index=t), torch.no_grad():
        return (layer(eye) - layer.base(eye)).T


def test_task_factors_and_delta_weight_match_the_forward():
    """``delta_weight`` and ``s · B_t A_t`` equal the update the routed forward really adds, and a
    folded linear layer carries exactly that update (an independent path: the forward gathers
    the coefficients, ``delta_weight`` multiplies the bases)."""
    layer = layer_with_tasks()
    for t in range(layer.num_tasks):
        applied = _applied_update(layer, t)
        assert applied.abs().max() > 1e-3  # not trivially zero
        B, A = layer.task_factors(t)
        assert torch.allclose(layer.delta_weight(t), applied, atol=1e-5)
        assert torch.allclose(layer.scaling * B @ A, applied, atol=1e-5)
        assert torch.allclose(layer.folded_linear(t).weight - layer.base.weight, applied, atol=1e-5)
    assert not torch.allclose(_applied_update(layer, 0), _applied_update(layer, 1), atol=1e-3)


def test_zero_init_leaves_the_model_unchanged_and_temporaries_start_outside_the_basis():
    layer = layer_with_tasks()
    g = torch.Generator().manual_seed(1)
    st = layer.begin_task(seed_rank=4, phi=2, init="zero", generator=g)
    x = torch.randn(2, 24)
    assert torch.allclose(layer(x), layer.base(x))
    assert (layer.U.T @ st.U_plus).abs().max() < 1e-5 and (layer.V.T @ st.V_plus).abs().max() < 1e-5
    names = {n for n, _ in st.named_parameters()}
    assert names == {"coeff_B", "coeff_A", "U_plus", "V_plus", "E_B", "E_A"}
    assert not any(p.requires_grad for p in layer.base.parameters())


def test_previous_init_starts_from_the_last_task():
    layer = layer_with_tasks()
    layer.begin_task(seed_rank=4, phi=2, init="previous", generator=torch.Generator().manual_seed(0))
    B, A = layer.trained_factors()
    B_last, A_last = layer.task_factors(layer.num_tasks - 1)
    assert torch.allclose(B @ A, B_last @ A_last, atol=1e-5)


def test_seed_state_is_a_plain_lora():
    layer = ShareLinear(nn.Linear(10, 8), scaling=2.0, p=2)
    st = layer.begin_task(seed_rank=4, phi=2, init="zero", generator=torch.Generator().manual_seed(0))
    assert st.kind == "seed" and st.lora_A.shape == (4, 10) and st.lora_B.shape == (8, 4)
    assert float(st.lora_B.detach().abs().max()) == 0.0


def test_temporary_directions_start_as_phi_init_says():
    import pytest

    layer = layer_with_tasks()
    x = torch.randn(2, 24)
    top = layer.begin_task(seed_rank=4, phi=2, init="zero", generator=torch.Generator().manual_seed(1), phi_init="top")
    assert torch.equal(top.U_plus, layer.U[:, :2]) and torch.equal(top.V_plus, layer.V[:, :2])  # the paper: top-φ directions
    assert torch.allclose(layer(x), layer.base(x))  # still ΔW = 0 at step 0
    wide = layer.begin_task(seed_rank=4, phi=9, init="zero", generator=torch.Generator().manual_seed(1), phi_init="top")
    k = layer.k[0]  # φ > k: every basis direction, then orthonormal columns outside the basis
    assert torch.equal(wide.U_plus[:, :k], layer.U) and (layer.U.T @ wide.U_plus[:, k:]).abs().max() < 1e-5
    uni = layer.begin_task(seed_rank=4, phi=2, init="zero", generator=torch.Generator().manual_seed(1), phi_init="uniform")
    assert uni.U_plus.abs().max() <= 0.5 and uni.U_plus.norm(dim=0).min() > 1.0  # the authors' code: U(−0.5, 0.5), not unit
    assert (layer.U.T @ uni.U_plus).abs().max() > 1e-2  # and not kept outside the basis
    with pytest.raises(ValueError, match="phi_init must be one of"):
        layer.begin_task(seed_rank=4, phi=2, init="zero", generator=torch.Generator(), phi_init="orthogonal")


def test_top_init_starts_a_at_the_top_basis_directions_with_zero_update():
    layer = layer_with_tasks()
    layer.begin_task(seed_rank=4, phi=2, init="top", generator=torch.Generator().manual_seed(0))
    B, A = layer.trained_factors()
    assert torch.count_nonzero(B) == 0  # ΔW = 0 at step 0
    k = layer.V.shape[1]  # inside the basis, A_t's rows are the two top input directions (the rest lies in V⁺)
    torch.testing.assert_close(A @ layer.V, torch.eye(2, k), atol=1e-5, rtol=0)
