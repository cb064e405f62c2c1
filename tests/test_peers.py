"""Tests that pin InfLoRA, SD-LoRA, DualLoRA and Share's class-incremental rule to their definitions."""

import pytest
import torch

from conftest import make_task
from sharecl.backbone import load_encoder
from sharecl.methods import DualLoRAMethod, InfLoRAMethod, SDLoRAMethod
from sharecl.methods.sdlora import gram_of_directions
from sharecl.train import train_steps


def _train(method, task, cfg):
    groups = method.begin_task(task, cfg)
    train_steps(method.training_forward(task), groups, task, cfg, progress=False)
    return method.end_task(task, cfg, progress=False)


@pytest.fixture
def enc(tiny_model_dir):
    return load_encoder(tiny_model_dir, max_length=16)


# ------------------------------------------------------------------ InfLoRA
def test_inflora_design_train_merge(enc, fast_cfg):
    m = InfLoRAMethod(enc, r=4, eps=0.9)
    m.begin_stream(3)
    _train(m, make_task("a"), fast_cfg)
    task = make_task("b", seed=1)
    groups = m.begin_task(task, fast_cfg)
    W0 = {n: layer.base.weight.detach().clone() for n, layer in m.layers.items()}
    A0 = {n: layer.A.clone() for n, layer in m.layers.items()}
    for n, layer in m.layers.items():
        A = layer.A / m.config.down_scale
        assert torch.allclose(A @ A.T, torch.eye(4), atol=1e-5)  # orthonormal rows
        M = m.memory_for(n).protected().float()
        assert M.shape[1] > 0 and torch.linalg.norm(M.T @ layer.A.T) <= 1e-5  # outside the memory
    train_steps(m.training_forward(task), groups, task, fast_cfg, progress=False)
    B = {n: layer.B.detach().clone() for n, layer in m.layers.items()}
    for n, layer in m.layers.items():  # training moved only the up-projection
        assert torch.equal(layer.A, A0[n]) and torch.equal(layer.base.weight, W0[n])
        assert B[n].abs().max() > 0
    covs = m.input_covariances(task.train_inputs)
    info = m.end_task(task, fast_cfg)
    assert info["threshold"] == pytest.approx(0.9 + (1 - 0.9) * 1 / 3)  # ε_t = ε + (1 − ε)·t/T, task t = 1 of T = 3
    for n, layer in m.layers.items():
        assert layer.A is None  # merged: W equals W + B_t A_t
        assert torch.allclose(layer.base.weight, W0[n] + B[n] @ A0[n], atol=1e-6)
        assert m.memory_for(n).kept_energy(covs[n]) >= info["threshold"] - 1e-6


def test_inflora_keeps_one_memory_and_one_down_projection_per_layer_input(enc, fast_cfg, tmp_path):
    """Query and value of a block read the same input (the official code's one memory per
    block's K/V): one group per block, one memory, one designed ``A_t``, stored once; the store
    reloads to the same outputs and learns on."""
    from sharecl.store import load_store, save_store

    m = InfLoRAMethod(enc, r=4, eps=0.9)
    m.begin_stream(3)
    _train(m, make_task("a"), fast_cfg)
    blocks = {n.rsplit(".", 2)[0] for n in m.layers}  # …attention.self
    assert len(m.groups) == len(blocks) == len(m.memory) and all(len(g) == 2 for g in m.groups.values())
    assert all({n.rsplit(".", 1)[1] for n in g} == {"query", "value"} for g in m.groups.values())
    task = make_task("b", seed=1)
    m.begin_task(task, fast_cfg)
    for members in m.groups.values():
        assert torch.equal(m.layers[members[0]].A, m.layers[members[1]].A)
    per_module = 4 * sum(layer.in_features + layer.out_features for layer in m.layers.values())
    assert m.adapter_numbers_per_task() == per_module - 4 * sum(m.layers[g].in_features for g in m.groups)
    m.end_task(task, fast_cfg, progress=False)
    manifest = save_store(m, tmp_path / "s")
    back = load_store(tmp_path / "s")
    assert back.groups == m.groups and manifest["method"] == "inflora"
    x = make_task("a").test_inputs
    for t in ("a", "b"):
        assert torch.equal(back.logits(x, t), m.logits(x, t))
    _train(back, make_task("c", seed=2), fast_cfg)  # the reloaded store learns on with its groups
    assert len(back.memory) == len(blocks)
    # a store written before input groups (one memory and one A_t per module) still loads the same
    _as_per_module_store(tmp_path / "s")
    old = load_store(tmp_path / "s")
    assert old.groups == {n: [n] for n in m.layers}
    for t in ("a", "b"):
        assert torch.equal(old.logits(x, t), m.logits(x, t))


def _as_per_module_store(path):
    """Rewrite a store in the layout of sharecl ≤ 0.1 InfLoRA (format 1; every module its own memory and A_t)."""
    from conftest import to_format1

    def per_module(tensors, meta):
        for g, members in meta.pop("input_groups").items():
            for n in members:
                meta["memory_kinds"][n] = meta["memory_kinds"][g]
                if f"memory.{g}" in tensors:
                    tensors[f"memory.{n}"] = tensors[f"memory.{g}"].clone()
                for t in range(meta["merged_tasks"]):
                    tensors[f"layers.{n}.A.{t}"] = tensors[f"layers.{g}.A.{t}"].clone()

    to_format1(path, per_module)


def _input_covariance_by_hand(m, inputs) -> dict:
    """``mean x xᵀ`` of each adapted layer's input over real tokens, each text run alone (no
    padding at all), captured with forward hooks on the wrapped ``nn.Linear``."""
    sums, counts, hooks = {}, {}, []
    for n, layer in m.layers.items():
        def hook(mod, args, n=n):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[n] = sums.get(n, 0) + x.T @ x
            counts[n] = counts.get(n, 0) + x.shape[0]
        hooks.append(layer.base.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for text in inputs:
                m.encoder.encode(m.encoder.tokenize([text]))
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / counts[n] for n in sums}


def test_inflora_designs_the_top_directions_of_the_projected_covariance(enc, fast_cfg):
    """The designed rows of A_t capture as much of ``Ĉ = (I − M Mᵀ) C`` as its r leading left
    singular vectors do (they are a top-r subspace), with C measured independently."""
    m = InfLoRAMethod(enc, r=4, eps=0.9)
    m.begin_stream(3)
    _train(m, make_task("a"), fast_cfg)
    task = make_task("b", seed=1)
    memory = {n: m.memory_for(n).protected().clone() for n in m.layers}
    C = _input_covariance_by_hand(m, task.train_inputs)
    m.begin_task(task, fast_cfg)
    for n, layer in m.layers.items():
        M = memory[n]
        P = torch.eye(M.shape[0], dtype=torch.float64) - M @ M.T
        residual = P @ C[n]
        sv = torch.linalg.svdvals(residual)
        A = layer.A.double() / m.config.down_scale  # (r, d_in), orthonormal rows
        captured = float(torch.linalg.norm(A @ residual) ** 2)  # ‖Aᵀ-projection of Ĉ's columns‖²
        best = float((sv[:4] ** 2).sum())
        assert sv[4] < 0.9 * sv[3] or captured == pytest.approx(best, rel=1e-3)
        assert captured == pytest.approx(best, rel=1e-3), (n, captured, best, sv[:6].tolist())
        assert captured > float((sv[4:8] ** 2).sum())  # and more than the next four directions would


def test_inflora_merge_preserves_outputs(enc, fast_cfg):
    m = InfLoRAMethod(enc, r=4)
    task = make_task("a")
    groups = m.begin_task(task, fast_cfg)
    train_steps(m.training_forward(task), groups, task, fast_cfg, progress=False)
    before = m.logits(task.test_inputs, "a")
    m.end_task(task, fast_cfg)
    assert torch.allclose(m.logits(task.test_inputs, "a"), before, atol=1e-5)


# ------------------------------------------------------------------ SD-LoRA
def test_sdlora_unit_directions_frozen_old_directions_and_moving_magnitudes(enc, fast_cfg):
    m = SDLoRAMethod(enc, r=4, lora_alpha=8)
    _train(m, make_task("a"), fast_cfg)
    task = make_task("b", seed=1)
    groups = m.begin_task(task, fast_cfg)
    old = {n: (layer.A_old.clone(), layer.B_old.clone()) for n, layer in m.layers.items()}
    alpha0 = m.magnitudes[0].item()
    train_steps(m.training_forward(task), groups, task, fast_cfg, progress=False)
    for n, layer in m.layers.items():
        assert torch.equal(layer.A_old, old[n][0]) and torch.equal(layer.B_old, old[n][1])
    assert m.magnitudes[0].item() != alpha0  # old magnitudes train with the new task
    m.end_task(task, fast_cfg)
    for layer in m.layers.values():
        for k in range(2):
            B, A = layer.direction(k)
            assert torch.linalg.norm(B @ A) == pytest.approx(1.0, abs=1e-5)


def _sd_updates(m) -> dict:
    """Every layer's update as its forward applies it, ``layer(I) − base(I)`` transposed ``(d_out, d_in)``."""
    out = {}
    with torch.no_grad():
        for n, layer in m.layers.items():
            eye = torch.eye(layer.in_features)
            out[n] = (layer(eye) - layer.base(eye)).T
    return out


def test_sdlora_freeze_keeps_the_least_squares_magnitude(enc, fast_cfg):
    """After a task, each layer's update becomes ``α D_l`` with ``‖D_l‖_F = 1`` along the trained
    update ``u_l``; the one magnitude α minimises ``Σ_l ‖α D_l − u_l‖²`` (checked by perturbation)."""
    m = SDLoRAMethod(enc, r=4, lora_alpha=8)
    task = make_task("a")
    groups = m.begin_task(task, fast_cfg)
    train_steps(m.training_forward(task), groups, task, fast_cfg, progress=False)
    trained = _sd_updates(m)
    m.end_task(task, fast_cfg)
    a = float(m.magnitudes[0])
    D = {n: u / a for n, u in _sd_updates(m).items()}
    norms = [float(torch.linalg.norm(u)) for u in trained.values()]
    assert max(norms) > 1.2 * min(norms)  # layers moved by different amounts: the fit is not trivial
    for n in D:
        assert float(torch.linalg.norm(D[n])) == pytest.approx(1.0, rel=1e-4)
        cos = float((D[n] * trained[n]).sum() / torch.linalg.norm(trained[n]))
        assert cos == pytest.approx(1.0, abs=1e-4)  # the direction is the trained update's

    def objective(x):
        return sum(float(((x * D[n] - trained[n]) ** 2).sum()) for n in D)

    for step in (1e-2, 1e-3):
        assert objective(a) < objective(a * (1 + step)) and objective(a) < objective(a * (1 - step))


def test_sdlora_freeze_preserves_the_function_when_layers_moved_equally(enc, fast_cfg):
    """When every layer's trained update has the same norm, freezing (unit directions + the
    least-squares magnitude) leaves every output unchanged."""
    m = SDLoRAMethod(enc, r=4, lora_alpha=8)
    task = make_task("a")
    groups = m.begin_task(task, fast_cfg)
    train_steps(m.training_forward(task), groups, task, fast_cfg, progress=False)
    with torch.no_grad():
        m.magnitudes[-1].fill_(1.0)  # the trained magnitude, too, is part of the update
        for layer in m.layers.values():  # rescale each layer's update to norm 0.7
            layer.B.mul_(0.7 / layer.current_norm())
    before = m.logits(task.test_inputs, "a")
    m.end_task(task, fast_cfg)
    assert float(m.magnitudes[0]) == pytest.approx(0.7, rel=1e-4)
    torch.testing.assert_close(m.logits(task.test_inputs, "a"), before, atol=1e-5, rtol=0)


def _direction_sum(m):
    return {n: sum(float(m.magnitudes[k]) * (lambda BA: BA[0] @ BA[1])(layer.direction(k)) for k in range(len(layer.ranks)))
            for n, layer in m.layers.items()}


def test_sdlora_kd_folds_an_explained_direction_exactly(enc, fast_cfg):
    m = SDLoRAMethod(enc, r=4, lora_alpha=8, kd=True)
    _train(m, make_task("a"), fast_cfg)
    _train(m, make_task("b", seed=1), fast_cfg)
    assert len(m.magnitudes) == 2 or m.folded[-1]["dropped"]
    # a third task whose update is 0.3·D_2 in every layer (per-layer normalisation keeps a multiple of
    # one old direction exactly explained): KD must drop it and fold it into the magnitudes
    task = make_task("c", seed=2)
    m.begin_task(task, fast_cfg)
    with torch.no_grad():
        for layer in m.layers.values():
            B2, A2 = layer.direction(1)
            layer.B.data = torch.cat([0.3 * B2, torch.zeros_like(B2)], 1) / layer.scaling
            layer.A.data = torch.cat([A2, A2], 0)
    before = {n: v + float(m.magnitudes[2]) * m.layers[n].scaling * (m.layers[n].B @ m.layers[n].A).detach()
              for n, v in _direction_sum(m).items()}
    info = m.end_task(task, fast_cfg)
    assert info["kd"]["dropped"] and info["kd"]["residual"] <= 1e-6
    assert info["kd"]["beta"] == pytest.approx([0.0, 1.0], abs=1e-3)
    assert len(m.magnitudes) == 2 and all(len(layer.ranks) == 2 for layer in m.layers.values())
    after = _direction_sum(m)
    for n in before:
        assert torch.allclose(after[n], before[n], atol=1e-5)


def test_sdlora_kd_keeps_a_new_direction(enc, fast_cfg):
    m = SDLoRAMethod(enc, r=4, lora_alpha=8, kd=True)
    _train(m, make_task("a"), fast_cfg)
    info = _train(m, make_task("b", seed=1), fast_cfg)
    assert not info["kd"]["dropped"] and info["kd"]["residual"] > 9e-4
    G = gram_of_directions(list(m.layers.values()))
    assert torch.allclose(torch.diag(G), torch.full((2,), float(len(m.layers)), dtype=torch.float64), atol=1e-4)


def test_sdlora_rr_schedule():
    from sharecl.methods.sdlora import SDLoRAConfig

    c = SDLoRAConfig(r=10, rr=True)
    assert [c.rank_for(i) for i in (0, 3, 4, 7, 8, 12)] == [10, 10, 8, 8, 6, 6]
    assert SDLoRAConfig(r=10).rank_for(9) == 10


# ------------------------------------------------------------------ DualLoRA
def test_duallora_orthogonal_update_and_frozen_residuals(enc, fast_cfg):
    m = DualLoRAMethod(enc, r=4, residual_rank=2, eps=0.9)
    m.begin_stream(2)
    _train(m, make_task("a"), fast_cfg)
    task = make_task("b", seed=1)
    groups = m.begin_task(task, fast_cfg)
    R_a = {n: layer.R.clone() for n, layer in m.layers.items()}
    U_a = {n: layer.U[:2].clone() for n, layer in m.layers.items()}
    train_steps(m.training_forward(task), groups, task, fast_cfg, progress=False)
    for n, layer in m.layers.items():
        M = m.memory[n].protected().float()
        delta = layer.scaling * (layer.B_O @ layer.orthogonal_down()).detach()
        assert delta.abs().max() > 0
        assert torch.linalg.norm(delta @ M) <= 1e-5 * max(1.0, float(torch.linalg.norm(delta)))  # orthogonal to the memory
        assert torch.equal(layer.R, R_a[n]) and torch.equal(layer.U[:2], U_a[n])  # task a's residual adapter untouched
        assert torch.linalg.norm(layer.U[2:].double() @ m.memory[n].protected()) <= 1e-5  # residual basis outside M


def test_duallora_without_orthogonal_adapter_never_moves_w_and_keeps_old_tasks(enc, fast_cfg):
    """Ablation switch: with ``orthogonal=False`` only residual adapters and heads train, so the
    shared weights stay the pretrained ones and an earlier task's task-id predictions are exact."""
    m = DualLoRAMethod(enc, r=4, residual_rank=2, orthogonal=False)
    before = {n: layer.base.weight.clone() for n, layer in m.layers.items()}
    m.begin_stream(2)
    a = make_task("a")
    _train(m, a, fast_cfg)
    logits_a = m.logits(a.test_inputs, "a")
    _train(m, make_task("b", seed=1), fast_cfg)
    for n, layer in m.layers.items():
        assert torch.equal(layer.base.weight, before[n])
        assert layer.R.abs().max() > 0  # the residual adapters did train
    assert torch.equal(m.logits(a.test_inputs, "a"), logits_a)
    with pytest.raises(ValueError, match="orthogonal"):
        DualLoRAMethod(enc, orthogonal="no")


def _disjoint_task(name: str, words: list[str], filler: list[str], seed: int):
    """A task whose inputs share no word with another task built from other words and filler."""
    import random

    from sharecl.data.tasks import split_task

    rng = random.Random(name)
    data = {f"{name}{i}": [" ".join(rng.choices(filler, k=4) + [w] + rng.choices(filler, k=3)) for _ in range(12)]
            for i, w in enumerate(words)}
    return split_task(name, data, seed=seed, train_per_class=None, test_per_class=4)


def test_duallora_cil_calibration_masks_other_tasks_when_confident(enc, fast_cfg):
    """Inputs of two tasks with no word in common: the energies identify the task (DualLoRA's
    dynamic memory), and every other task's logits are masked."""
    m = DualLoRAMethod(enc, r=4, residual_rank=2, confidence=0.0)  # always confident
    m.begin_stream(2)
    tasks = [_disjoint_task("a", ["apple", "river", "engine"], "the a of and to in is".split(), 0),
             _disjoint_task("b", ["violin", "planet", "garden"], "was for on with as by at".split(), 1)]
    for t in tasks:
        _train(m, t, fast_cfg)
    right = 0
    for truth, t in enumerate(tasks):
        logits = m.cil_logits(t.test_inputs)
        pred, _ = m.last_task_prediction
        right += int((pred == truth).sum())
        for row, k in zip(logits, pred.tolist()):
            finite = torch.isfinite(row).nonzero().flatten().tolist()
            assert finite == list(range(3 * k, 3 * k + 3))
    assert right / sum(len(t.test_inputs) for t in tasks) >= 0.75, right  # 21 of 24 on the reference machine


# ------------------------------------------------------------------ Share, class-incremental
def test_share_cil_scores_are_each_tasks_log_probabilities(tiny_share, fast_cfg):
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        tiny_share.learn(t, fast_cfg, progress=False)
    x = tasks[0].test_inputs + tasks[1].test_inputs
    scores = tiny_share.cil_logits(x, score="max-prob")
    assert scores.shape == (len(x), 6)
    for i, t in enumerate(tasks):
        expect = torch.log_softmax(tiny_share.logits(x, t.name), -1)
        assert torch.allclose(scores[:, 3 * i: 3 * i + 3], expect, atol=1e-5)


def test_til_only_method_refuses_cil_logits(tiny_model_dir):
    from sharecl.methods import UnsupportedScenarioError, build_method

    m = build_method("lora-per-task", load_encoder(tiny_model_dir, max_length=16))
    with pytest.raises(UnsupportedScenarioError, match="til"):
        m.cil_logits(["x"])


def test_share_cil_scores_pick_the_task_their_rule_names(tiny_share, fast_cfg):
    """Heads set to constant logits (zero weights, chosen biases), so each rule's winner is known by hand:
    task a [5, 0, 0] (softmax max 0.987, logsumexp 5.013) against task b [4, 4, 4] (1/3, 5.099) or
    b [6, 6, −20] (0.5, 6.693)."""
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        tiny_share.learn(t, fast_cfg, progress=False)
    x = tasks[0].test_inputs
    cases = {  # b's logits → the column each rule must pick (a's classes are 0-2, b's 3-5)
        (4.0, 4.0, 4.0): {"max-prob": 0, "max-logit": 0, "energy": 3},
        (6.0, 6.0, -20.0): {"max-prob": 0, "max-logit": 3, "energy": 3},
    }
    for b_logits, want in cases.items():
        with torch.no_grad():
            for name, bias in (("a", (5.0, 0.0, 0.0)), ("b", b_logits)):
                head = tiny_share.heads.heads[name]
                head.weight.zero_()
                head.bias.copy_(torch.tensor(bias))
        for score, column in want.items():
            pred = tiny_share.cil_logits(x, score=score).argmax(-1)
            assert pred.tolist() == [column] * len(x), (b_logits, score)
    with pytest.raises(ValueError, match="score"):
        tiny_share.cil_logits(x, score="vote")


def _folded_features(m, task_name, inputs):
    """Mean-pooled features from a copy of the backbone with the task's ΔW folded in (no routing)."""
    batch = m.encoder.tokenize(inputs)
    with torch.no_grad():
        h = m.folded_model(task_name)(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (h * mask).sum(1) / mask.sum(1)


def test_share_prototypes_are_class_means_and_pick_the_most_similar_task(tiny_share, fast_cfg, tmp_path):
    tasks = [make_task("a"), make_task("b", seed=1)]
    tiny_share.learn(tasks[0], fast_cfg, progress=False)
    z, y = _folded_features(tiny_share, "a", tasks[0].train_inputs), torch.tensor(tasks[0].train_labels)
    expect = torch.stack([z[y == c].mean(0) for c in range(3)])
    assert tiny_share.prototypes["a"].shape == (3, 32)
    assert torch.allclose(tiny_share.prototypes["a"], expect, atol=1e-5)
    tiny_share.learn(tasks[1], fast_cfg, progress=False)
    x = tasks[0].test_inputs + tasks[1].test_inputs
    sims = [torch.nn.functional.cosine_similarity(_folded_features(tiny_share, t.name, x)[:, None],
                                                  tiny_share.prototypes[t.name][None], dim=-1).max(-1).values for t in tasks]
    best_task = torch.stack(sims, -1).argmax(-1)
    per_task = [tiny_share.logits(x, t.name) for t in tasks]
    expect = torch.stack([per_task[int(t)][i].argmax() + 3 * int(t) for i, t in enumerate(best_task)])
    scores = tiny_share.cil_logits(x)  # the default rule
    assert tiny_share.config.cil_score == "prototype" and torch.equal(scores.argmax(-1), expect)
    from sharecl.store import load_store, save_store

    save_store(tiny_share, tmp_path / "s")
    again = load_store(tmp_path / "s")
    assert torch.equal(again.prototypes["b"], tiny_share.prototypes["b"])
    assert torch.allclose(again.cil_logits(x), scores, atol=1e-6)
    assert tiny_share.head_numbers_per_task() == 3 * 32 + 3 + 3 * 32  # head weight + bias + prototypes
    del again.prototypes["a"]  # as in a store written before prototypes existed
    with pytest.raises(ValueError, match=r"\['a'\] have no class prototypes.*'energy'"):
        again.cil_logits(x)
    assert again.cil_logits(x, score="energy").shape == (len(x), 6)


def test_unknown_method_option_is_a_clear_error(tiny_model_dir):
    from sharecl.methods import build_method

    with pytest.raises(ValueError, match="'inflora'.*'rank'"):
        build_method("inflora", load_encoder(tiny_model_dir, max_length=16), rank=4)
