"""Share folding LoRAs in batches (the paper's batch arrival): one truncation per batch."""

import pytest
import torch

from sharecl.store import load_store, save_store


def _adapter(method, seed, r=4, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.randn(layer.out_features, r, generator=g) * scale, torch.randn(r, layer.in_features, generator=g) * scale)
            for n, layer in method.layers.items()}


def _balanced_cut(B, A, p):
    """The best rank-p part of B A in balanced form, B_p = U_p √S_p, computed here by a dense SVD."""
    u, s, _ = torch.linalg.svd((B @ A).double(), full_matrices=False)
    return u[:, :p] * s[:p].sqrt()


def _share(model_dir, **kw):
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod

    return ShareMethod(load_encoder(model_dir, max_length=16), seed=0, **kw)


def _residual(U, columns):
    """Σ ‖(I − U Uᵀ) X‖² over the given columns: what the basis U fails to hold."""
    X = torch.cat(columns, 1)
    U = U.double()
    return float(((X - U @ (U.T @ X)) ** 2).sum())


def test_batch_without_truncation_equals_one_by_one(tiny_model_dir):
    big = dict(r=4, lora_alpha=8, p=2, k=64, phi=2)  # k ≥ every task's columns: no merge truncates
    one, batch = _share(tiny_model_dir, **big), _share(tiny_model_dir, **big)
    adapters = [(f"t{i}", _adapter(one, i), 1.0) for i in range(4)]
    for a in adapters:
        one.add_adapter(*a)
    records = batch.add_adapters(adapters)
    assert len(records) == 4 and batch.task_names == one.task_names == [a[0] for a in adapters]
    for name in one.layers:
        for i in range(4):
            assert torch.allclose(one.layers[name].delta_weight(i), batch.layers[name].delta_weight(i), atol=1e-6)


def test_batch_basis_is_the_best_rank_k_fit_of_the_batch(tiny_model_dir):
    """From an empty store, the batch's basis is the top-k of all members' rank-p factors (Eckart–Young):
    no basis of that size holds them better, so folding one by one (k truncations) cannot do better."""
    kw = dict(r=4, lora_alpha=8, p=2, k=4, phi=2)
    one, batch = _share(tiny_model_dir, **kw), _share(tiny_model_dir, **kw)
    adapters = [(f"t{i}", _adapter(one, 10 + i), 1.0) for i in range(5)]  # 5 tasks × p 2 = 10 > k 4
    for a in adapters:
        one.add_adapter(*a)
    batch.add_adapters(adapters)
    s = batch.config.scaling
    for name, layer in batch.layers.items():
        assert layer.U.shape[1] == 4 and layer.V.shape[1] == 4  # the configured k once the batch is in
        cuts = [_balanced_cut(s * B, A, 2) for _, f, _ in adapters for B, A in [f[name]]]
        u, _, _ = torch.linalg.svd(torch.cat(cuts, 1), full_matrices=False)
        best = _residual(u[:, :4], cuts)
        assert _residual(layer.U, cuts) == pytest.approx(best, rel=1e-4, abs=1e-10)
        assert _residual(one.layers[name].U, cuts) >= best * (1 - 1e-4)

    def total(m):
        return sum(_residual(m.layers[n].U, [_balanced_cut(s * f[n][0], f[n][1], 2) for _, f, _ in adapters]) for n in m.layers)

    assert total(batch) < total(one)  # random adapters: the sequential truncations lose strictly more


def test_a_bad_member_leaves_the_model_untouched(tiny_share):
    m = tiny_share
    m.add_adapters([("a", _adapter(m, 0), 1.0), ("b", _adapter(m, 1), 1.0)])
    before = {n: (layer.U.clone(), layer.V.clone()) for n, layer in m.layers.items()}
    first = next(iter(m.layers))
    bad = {**_adapter(m, 3), first: (torch.zeros(3, 4), torch.zeros(4, 5))}
    with pytest.raises(ValueError, match="do not fit"):
        m.add_adapters([("c", _adapter(m, 2), 1.0), ("d", bad, 1.0)])
    with pytest.raises(ValueError, match="twice"):
        m.add_adapters([("c", _adapter(m, 2), 1.0), ("c", _adapter(m, 4), 1.0)])
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapters([("c", _adapter(m, 2), 1.0), ("a", _adapter(m, 4), 1.0)])
    assert m.task_names == ["a", "b"]
    for n, layer in m.layers.items():
        assert torch.equal(layer.U, before[n][0]) and torch.equal(layer.V, before[n][1])


def test_batches_save_reload_fold_again_reload(tiny_share, tmp_path):
    m, store = tiny_share, tmp_path / "store"
    m.add_adapters([(f"a{i}", _adapter(m, i), 1.0) for i in range(3)])
    save_store(m, store)
    seen = load_store(store)
    for name, layer in m.layers.items():
        for i in range(3):
            assert torch.equal(seen.layers[name].delta_weight(i), layer.delta_weight(i))
    seen.add_adapters([(f"b{i}", _adapter(seen, 10 + i), 1.0) for i in range(3)])
    save_store(seen, store)
    again = load_store(store)
    assert again.task_names == ["a0", "a1", "a2", "b0", "b1", "b2"]
    for name, layer in seen.layers.items():
        assert again.layers[name].U.shape[1] == 4
        for i in range(6):
            assert torch.equal(again.layers[name].delta_weight(i), layer.delta_weight(i))
