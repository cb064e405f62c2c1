"""ShareMethod on a tiny random BERT: learning, merging, adapter-only tasks, mixed batches."""

import pytest
import torch

from conftest import make_task
from sharecl.methods.share import ShareConfig, ShareMethod
from sharecl.train import NonFiniteLossError, TrainConfig, evaluate


def test_two_tasks_learn_merge_and_keep_old_tasks(tiny_share, fast_cfg):
    m = tiny_share
    t1, t2 = make_task("first"), make_task("second", seed=1)
    info = m.learn(t1, fast_cfg, progress=False)
    # the seed LoRA's four directions build the basis (k = 4); the task itself is kept at p = 2 and
    # what that costs it is recorded (METHODS.md §1, the new task's own truncation)
    assert info["merge"]["k"][0] == [4, 4]
    assert 0 < info["merge"]["new_task"]["truncation_mean"] <= info["merge"]["new_task"]["truncation_max"] < 1
    before = [m.logits(t1.test_inputs, "first").detach()]
    m.learn(t2, fast_cfg, progress=False)
    rec = m.drift[-1]
    assert set(rec["per_task"]) == {"first"}
    assert rec["k"][0] == [4, 4]  # 2 tasks × p=2 fit in k=4: nothing truncated
    assert rec["per_task"]["first"]["max"] < 1e-4
    after = m.logits(t1.test_inputs, "first").detach()
    assert torch.allclose(before[0], after, atol=1e-4)  # first task unchanged by the merge
    for layer in m.layers.values():
        assert layer.coeff_B.shape == (2, 4, 2)
        assert torch.allclose(layer.U.T @ layer.U, torch.eye(4), atol=1e-5)


def test_truncating_merge_records_drift(tiny_model_dir, fast_cfg):
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod

    m = ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=2, phi=2)
    m.learn(make_task("a"), fast_cfg, progress=False)
    before = {n: layer.delta_weight(0).double() for n, layer in m.layers.items()}  # task a's ΔW, full width
    m.learn(make_task("b", seed=1), fast_cfg, progress=False)
    # the relative Frobenius change of a's ΔW in each layer, from the full matrices before and after the merge
    rel = torch.tensor([float((layer.delta_weight(0).double() - before[n]).norm() / before[n].norm()) for n, layer in m.layers.items()])
    d = m.drift[-1]["per_task"]["a"]
    assert d["mean"] == pytest.approx(rel.mean().item(), rel=1e-4) and d["max"] == pytest.approx(rel.max().item(), rel=1e-4)
    assert rel.max() > 1e-3  # k = 2 cannot hold both tasks: the merge does move task a
    assert all(k == [2, 2] for k in m.drift[-1]["k"])


def test_mixed_batch_equals_per_task_logits(tiny_share, fast_cfg):
    m = tiny_share
    tasks = [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)]
    for t in tasks:
        m.learn(t, fast_cfg, progress=False)
    inputs = [tasks[i % 3].test_inputs[i] for i in range(6)]
    names = [tasks[i % 3].name for i in range(6)]
    mixed = m.mixed_logits(inputs, names)
    for x, n, got in zip(inputs, names, mixed):
        want = m.logits([x], n)[0]
        assert torch.allclose(got, want, atol=1e-5)


def test_folded_model_matches_adapter(tiny_share, fast_cfg):
    m = tiny_share
    t = make_task("a")
    m.learn(t, fast_cfg, progress=False)
    batch = m.encoder.tokenize(t.test_inputs)
    with m.task(m.task_names[0]):
        want = m.encoder.model(**batch).last_hidden_state
    got = m.folded_model("a")(**batch).last_hidden_state
    assert torch.allclose(got, want, atol=1e-5)


def test_training_moves_only_coefficients_temporaries_and_head(tiny_share, fast_cfg):
    m = tiny_share
    m.learn(make_task("a"), fast_cfg, progress=False)
    frozen = {n: p.detach().clone() for n, p in m.encoder.model.named_parameters()}
    U0 = {n: (l.U.clone(), l.V.clone()) for n, l in m.layers.items()}
    groups = m.begin_task(make_task("b", seed=1), fast_cfg)
    names = {n for l in m.layers.values() for n, _ in l.train_state.named_parameters()}
    assert names == {"coeff_B", "coeff_A", "U_plus", "V_plus", "E_B", "E_A"}
    from sharecl.train import train_steps

    train_steps(m.training_forward(make_task("b", seed=1)), groups, make_task("b", seed=1), fast_cfg, progress=False)
    for n, p in m.encoder.model.named_parameters():
        if "train_state" not in n:
            assert torch.equal(p, frozen[n]), n
    for n, l in m.layers.items():
        assert torch.equal(l.U, U0[n][0]) and torch.equal(l.V, U0[n][1])


def test_merge_finetune_moves_only_the_new_tasks_coefficients(tiny_model_dir, fast_cfg):
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod

    def fresh(steps, k):
        return ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=k,
                           merge_finetune_steps=steps)

    plain, tuned = fresh(0, 2), fresh(3, 2)
    for m in (plain, tuned):
        m.learn(make_task("a"), fast_cfg, progress=False)
    assert all(l.train_state is None for l in tuned.layers.values())
    for name in plain.layers:  # the merged basis is the same; only the task's coefficients moved
        assert torch.equal(plain.layers[name].U, tuned.layers[name].U)
        assert torch.equal(plain.layers[name].V, tuned.layers[name].V)
    assert any(not torch.equal(plain.layers[n].coeff_A[0], tuned.layers[n].coeff_A[0]) for n in plain.layers)

    m = fresh(3, 4)  # k = T·p: the merge truncates nothing, and fine-tuning b must not move a
    a = make_task("a")
    m.learn(a, fast_cfg, progress=False)
    before = m.logits(a.test_inputs, "a").detach()
    m.learn(make_task("b", seed=1), fast_cfg, progress=False)
    assert torch.allclose(m.logits(a.test_inputs, "a"), before, atol=1e-4)


def test_adapter_only_task_is_folded_without_data(tiny_share, fast_cfg):
    m = tiny_share
    m.learn(make_task("a"), fast_cfg, progress=False)
    g = torch.Generator().manual_seed(0)
    factors = {n: (torch.randn(l.out_features, 4, generator=g) * 0.1, torch.randn(4, l.in_features, generator=g) * 0.1)
               for n, l in m.layers.items()}
    rec = m.add_adapter("ext", factors, scaling=1.0)
    assert m.kinds["ext"] == "adapter" and "a" in rec["per_task"]
    with pytest.raises(ValueError, match="already exists"):
        m.add_adapter("ext", factors, scaling=1.0)
    prefixed = {f"bert.{n}": f for n, f in factors.items()}  # as saved from BertForSequenceClassification
    m.add_adapter("ext-prefixed", prefixed, scaling=1.0)
    for layer in m.layers.values():
        assert torch.allclose(layer.delta_weight(1), layer.delta_weight(2), atol=1e-5)
    subset = dict(list(factors.items())[1:])  # an adapter on some of the targets: the others get no update
    assert m.add_adapter("ext-subset", subset, scaling=1.0)["layers_without_update"] == 1
    first = next(iter(factors))
    assert float(m.layers[first].delta_weight(m.index("ext-subset")).abs().max()) == 0.0
    with pytest.raises(ValueError, match="unexpected"):
        m.add_adapter("ext2", {**factors, "encoder.pooler.dense": factors[first]}, scaling=1.0)
    with pytest.raises(ValueError, match="unexpected"):
        m.add_adapter("ext3", {}, scaling=1.0)


def test_nan_loss_is_refused(tiny_share, fast_cfg):
    layer = next(iter(tiny_share.layers.values()))
    layer.register_forward_hook(lambda mod, inp, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        tiny_share.learn(make_task("a"), fast_cfg, progress=False)


def test_config_errors():
    with pytest.raises(ValueError, match="not both"):
        ShareConfig(k=4, energy=0.9)
    with pytest.raises(ValueError, match="cannot exceed"):
        ShareConfig(r=2, p=4)
    with pytest.raises(ValueError, match="init"):
        ShareConfig(init="random")


def test_unknown_task_and_duplicate_name(tiny_share, fast_cfg):
    tiny_share.learn(make_task("a"), fast_cfg, progress=False)
    with pytest.raises(KeyError, match="unknown task 'zzz'"):
        tiny_share.logits(["x"], "zzz")
    with pytest.raises(ValueError, match="already exists"):
        tiny_share.learn(make_task("a"), fast_cfg, progress=False)


def test_learning_reaches_above_chance(tiny_share):
    cfg = TrainConfig(steps=40, batch_size=8, lr=2e-2, head_lr=2e-2, max_length=16)
    t = make_task("a", n_per_class=20)
    tiny_share.learn(t, cfg, progress=False)
    assert evaluate(lambda xs: tiny_share.logits(xs, "a"), t, 32) > 0.6  # 3 classes: chance is 1/3


def test_coeff_lr_ratio_moves_coefficients_faster_and_directions_alike(tiny_model_dir, fast_cfg):
    """From the same start, AdamW's first step moves each parameter by ``lr · sign(g)``: the
    coefficients move ``coeff_lr_ratio`` times as far as at ratio 1. The temporary directions get
    their first gradient at step 2 (``E_B = 0`` before), where Adam's step is ``≈ 0.74 · lr · sign(g)``
    whatever the gradient's size: they move as far as at ratio 1, or ``phi_lr_ratio`` times as far."""
    from sharecl.backbone import load_encoder

    def moved(ratio, phi_ratio=1.0, steps=1):
        m = ShareMethod(load_encoder(tiny_model_dir), seed=0, r=4, k=4, p=2, coeff_lr_ratio=ratio, phi_lr_ratio=phi_ratio)
        m.learn(make_task("a", 0), fast_cfg, progress=False)
        task = make_task("b", 1)
        groups = m.begin_task(task, fast_cfg)
        st = next(iter(m.layers.values())).train_state
        start = {n: p.detach().clone() for n, p in st.named_parameters()}
        opt = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
        for _ in range(steps):
            opt.zero_grad()
            loss, _ = m.training_forward(task)(task.train_inputs[:8], torch.tensor(task.train_labels[:8]))
            loss.backward()
            opt.step()
        return {n: (p.detach() - start[n]).abs().max().item() for n, p in st.named_parameters()}

    one, ten = moved(1.0), moved(10.0)
    for name in ("coeff_B", "coeff_A", "E_A"):
        assert ten[name] == pytest.approx(10 * one[name], rel=1e-3), (name, one, ten)
    assert one["coeff_B"] == pytest.approx(fast_cfg.lr, rel=1e-3) and one["U_plus"] == 0.0  # no gradient yet
    base, coeff10, both10 = moved(1.0, steps=2), moved(10.0, steps=2), moved(10.0, 10.0, steps=2)
    assert base["U_plus"] > 0.5 * fast_cfg.lr  # the directions did move at step 2
    assert coeff10["U_plus"] == pytest.approx(base["U_plus"], rel=5e-2)  # the coefficients' ratio leaves them alone (Adam's eps: ± 2 %)
    assert both10["U_plus"] == pytest.approx(10 * base["U_plus"], rel=5e-2)
    with pytest.raises(ValueError, match="coeff_lr_ratio must be positive"):
        ShareConfig(coeff_lr_ratio=0)
    with pytest.raises(ValueError, match="phi_lr_ratio must be positive"):
        ShareConfig(phi_lr_ratio=-1.0)


def test_config_left_none_takes_the_family_default_in_a_copy(tiny_model_dir):
    from dataclasses import asdict

    from conftest import tiny_lm
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import SHARE_DEFAULTS

    given = ShareConfig(energy=0.9, r=4)  # energy alone: the energy rule, no "give k or energy" error
    before = asdict(given)
    m = ShareMethod(load_encoder(tiny_model_dir), seed=0, config=given)
    assert asdict(given) == before  # the caller's config is never changed (target_modules stays None)
    assert m.config.k is None and m.config.energy == 0.9 and m.config.target_modules == ["query", "value"]
    assert (m.config.p, m.config.phi) == (SHARE_DEFAULTS["encoder"]["p"], SHARE_DEFAULTS["encoder"]["phi"])
    lm = ShareMethod(tiny_lm(), seed=0, config=given)
    assert lm.config.p == min(SHARE_DEFAULTS["lm"]["p"], 4) and lm.config.target_modules != ["query", "value"]
    assert lm.config.coeff_lr_ratio == SHARE_DEFAULTS["lm"]["coeff_lr_ratio"]
    blocks = lm.encoder.model.config.num_hidden_layers  # every linear layer of every block but the LM head:
    assert len(lm.layers) == 7 * blocks and not any("lm_head" in n for n in lm.layers)  # q, k, v, o, gate, up, down
    set_k = ShareMethod(load_encoder(tiny_model_dir), seed=0, r=4, k=3, p=1)
    assert (set_k.config.k, set_k.config.p, set_k.config.energy) == (3, 1, None)  # what is given is kept
    with pytest.raises(ValueError, match="energy must be a fraction"):
        ShareConfig(energy=1.5)
    with pytest.raises(KeyError, match="unknown backbone family"):
        ShareConfig().resolved("rnn")
