"""Classifier alignment from class statistics (sharecl.align, --align): toy Gaussians, methods, stores."""

import pytest
import torch
from torch import nn

from sharecl.align import align_heads, class_statistics, sample_features


def _toy(seed: int = 0, tasks: int = 3, per_task: int = 2, h: int = 12, n: int = 400):
    """Separable Gaussian classes in ``h`` dimensions, ``per_task`` per task; each task's head is
    trained on its own classes only (as a continual learner trains it)."""
    g = torch.Generator().manual_seed(seed)
    C = tasks * per_task
    means = torch.randn(C, h, generator=g) * 3
    mix = torch.randn(C, h, h, generator=g) * 0.4
    def draw(c, m):
        return means[c] + torch.randn(m, h, generator=g) @ mix[c].T
    train = [(torch.cat([draw(c, n) for c in range(t * per_task, (t + 1) * per_task)]),
              torch.arange(per_task).repeat_interleave(n)) for t in range(tasks)]
    test_x = torch.cat([draw(c, 200) for c in range(C)])
    test_y = torch.arange(C).repeat_interleave(200)
    return train, test_x, test_y, means, mix


def _fit(head: nn.Module, x, y, steps=300, lr=0.05):
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _cil_acc(heads, x, y):
    with torch.no_grad():
        return float((torch.cat([hd(x) for hd in heads], -1).argmax(-1) == y).float().mean())


def test_statistics_and_samples_recover_the_gaussians():
    g = torch.Generator().manual_seed(1)
    mean, A = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([[1.0, 0, 0], [0.5, 2.0, 0], [0, -1.0, 0.3]])
    x = torch.cat([mean + torch.randn(20000, 3, generator=g) @ A.T, torch.randn(20000, 3, generator=g)])
    y = torch.cat([torch.zeros(20000, dtype=torch.long), torch.ones(20000, dtype=torch.long)])
    means, covs = class_statistics(x, y, 2)
    assert means.shape == (2, 3) and covs.shape == (2, 3, 3) and means.dtype == torch.float32
    assert torch.allclose(means[0], mean, atol=0.05) and torch.allclose(covs[0], A @ A.T, atol=0.1)
    assert torch.allclose(covs[1], torch.eye(3), atol=0.05)
    z, zy = sample_features(means, covs, 20000, torch.Generator().manual_seed(2), ridge=0.0)
    assert z.shape == (40000, 3) and zy.tolist() == [0] * 20000 + [1] * 20000
    assert torch.allclose(z[:20000].mean(0), mean, atol=0.05) and torch.allclose(torch.cov(z[:20000].T), A @ A.T, atol=0.12)
    with pytest.raises(ValueError, match="at least 2"):
        class_statistics(x[:3], torch.tensor([0, 0, 1]), 2)


def test_alignment_from_statistics_reaches_a_joint_head_on_separable_gaussians():
    torch.manual_seed(0)
    train, test_x, test_y, _, _ = _toy()
    heads = [nn.Linear(12, 2) for _ in train]
    for hd, (x, y) in zip(heads, train):
        _fit(hd, x, y)  # each head sees only its own task's classes
    separate = _cil_acc(heads, test_x, test_y)
    joint = nn.Linear(12, 6)  # the reference: one head trained on the real features of every class
    _fit(joint, torch.cat([x for x, _ in train]), torch.cat([y + 2 * t for t, (_, y) in enumerate(train)]))
    joint_acc = _cil_acc([joint], test_x, test_y)
    stats = [class_statistics(x, y, 2) for x, y in train]
    info = align_heads(heads, stats, steps=300, per_class=64, lr=0.05, generator=torch.Generator().manual_seed(3))
    aligned = _cil_acc(heads, test_x, test_y)
    assert info["loss_after"] < info["loss_before"]
    assert joint_acc > 0.9 and separate < joint_acc - 0.05  # the toy needs alignment: heads alone are miscalibrated
    assert aligned >= joint_acc - 0.03, (separate, aligned, joint_acc)


def test_low_rank_statistics_keep_the_top_directions_and_every_variance():
    from sharecl.align import full_covariances, low_rank_statistics

    g = torch.Generator().manual_seed(5)
    h, r = 10, 3
    factor = torch.randn(2, h, r, generator=g) * 2
    noise = torch.rand(2, h, generator=g) * 0.1 + 0.05
    covs = factor @ factor.transpose(1, 2) + torch.diag_embed(noise)  # rank-3 signal plus a small diagonal
    means = torch.randn(2, h, generator=g)
    m, f, d = low_rank_statistics(means, covs, r)
    assert f.shape == (2, h, r) and d.shape == (2, h) and torch.equal(m, means)
    _, approx = full_covariances((m, f, d))
    assert torch.allclose(approx.diagonal(dim1=-2, dim2=-1), covs.diagonal(dim1=-2, dim2=-1), atol=1e-5)  # variances kept
    assert (approx - covs).norm() / covs.norm() < 0.05  # off the diagonal only the small noise is missed
    _, exact = full_covariances(low_rank_statistics(means, covs, h))
    assert torch.allclose(exact, covs, atol=1e-4)  # all directions: the covariance itself
    assert (low_rank_statistics(means, covs, 1)[2] >= 0).all()
    with pytest.raises(ValueError, match="rank must be in"):
        low_rank_statistics(means, covs, 0)


def test_alignment_from_low_rank_statistics_still_reaches_a_joint_head():
    from sharecl.align import low_rank_statistics

    torch.manual_seed(0)
    train, test_x, test_y, _, _ = _toy()
    heads = [nn.Linear(12, 2) for _ in train]
    for hd, (x, y) in zip(heads, train):
        _fit(hd, x, y)
    joint = nn.Linear(12, 6)
    _fit(joint, torch.cat([x for x, _ in train]), torch.cat([y + 2 * t for t, (_, y) in enumerate(train)]))
    stats = [low_rank_statistics(*class_statistics(x, y, 2), rank=4) for x, y in train]
    align_heads(heads, stats, steps=300, per_class=64, lr=0.05, generator=torch.Generator().manual_seed(3))
    assert _cil_acc(heads, test_x, test_y) >= _cil_acc([joint], test_x, test_y) - 0.03


def test_align_heads_rejects_mismatched_statistics():
    stats = [(torch.zeros(3, 4), torch.eye(4).repeat(3, 1, 1))]
    with pytest.raises(ValueError, match="one row per class"):
        align_heads([nn.Linear(4, 2)], stats, steps=1, per_class=2, lr=0.1, generator=torch.Generator())


@pytest.mark.parametrize("name,rank", [("inflora", None), ("dual-lora", None), ("sd-lora", 4)])
def test_methods_align_and_stores_keep_the_statistics(name, rank, tiny_model_dir, fast_cfg, tmp_path):
    from dataclasses import replace

    from conftest import make_task
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method
    from sharecl.store import load_store, save_store, store_class_statistics

    cfg = replace(fast_cfg, align=True, align_steps=5, align_samples=4, align_rank=rank)
    tasks = [make_task("a"), make_task("b", seed=1)]
    xs = [x for t in tasks for x in t.test_inputs]
    method = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, r=4)
    method.begin_stream(None)
    before_heads = None
    for i, task in enumerate(tasks):
        info = method.learn(task, cfg, progress=False)
        assert info["align"]["classes"] == 3 * (i + 1)
        if i == 1:
            assert not torch.equal(method.heads.heads["a"].weight, before_heads)  # the old head was re-trained
        before_heads = method.heads.heads["a"].weight.detach().clone()
        stats = method.class_stats[task.name]
        assert stats[0].shape == (3, 32)
        assert [x.shape for x in stats[1:]] == ([(3, 32, 32)] if rank is None else [(3, 32, rank), (3, 32)])
        with torch.no_grad():
            want = method.cil_logits(xs)
        save_store(method, tmp_path / "s")
        method = load_store(tmp_path / "s")
        with torch.no_grad():
            assert torch.equal(method.cil_logits(xs), want)
        assert set(method.class_stats) == {t.name for t in tasks[: i + 1]}
        kind = "full covariances" if rank is None else f"rank {rank} + diagonal"
        assert store_class_statistics(tmp_path / "s") == {t.name: kind for t in tasks[: i + 1]}
        assert all(torch.equal(a, b) for a, b in zip(method.class_stats[task.name], stats, strict=True))
    # a reloaded aligned store aligns the next task whatever learn is given, at its own rank
    info = method.learn(make_task("c", seed=2), fast_cfg, progress=False)
    assert info["align"]["classes"] == 9 and method.kept_align_rank() == rank
    assert [x.shape for x in method.class_stats["c"][1:]] == ([(3, 32, 32)] if rank is None else [(3, 32, rank), (3, 32)])
    # statistics count as head bytes: per class a mean and a covariance (full, or rank·32 + 32)
    head = 3 * 33
    assert method.head_numbers_per_task() == head + 3 * 32 + (3 * 32 * 32 if rank is None else 3 * (32 * rank + 32))


def test_share_aligns_task_identification_on_the_base_models_features(tiny_model_dir, fast_cfg, tmp_path):
    from dataclasses import replace

    from conftest import make_task
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.store import load_store, save_store

    tasks = [make_task("a"), make_task("b", seed=1), make_task("c", seed=2)]
    xs = [x for t in tasks for x in t.test_inputs]
    aligned_cfg = replace(fast_cfg, align=True, align_steps=5, align_samples=4)

    def share():
        return ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)

    m, plain = share(), share()
    base = load_encoder(tiny_model_dir, max_length=16)  # a fresh copy of the pretrained model, no adapter
    head_a = None
    for i, t in enumerate(tasks):
        torch.manual_seed(i)  # dropout draws from the global generator; nn.Linear's own init (a new head) does too
        info = m.learn(t, aligned_cfg, progress=False)
        torch.manual_seed(i)
        plain.learn(t, fast_cfg, progress=False)
        assert info["align"]["classes"] == 3 * (i + 1) and m.config.cil_score == "aligned"
        with torch.no_grad():
            # the statistics are taken on the pretrained model's features, which Share never moves
            assert torch.allclose(m.cil_features(t.train_inputs), base.encode(base.tokenize(t.train_inputs)), atol=1e-5)
            # alignment touches neither the coefficients nor the task heads: task-incremental logits stay
            # (to float32 round-off: m is reloaded from its store each task, plain never is)
            for old in tasks[: i + 1]:
                assert torch.allclose(m.logits(old.test_inputs, old.name), plain.logits(old.test_inputs, old.name), atol=1e-6)
            joint = m.cil_logits(xs)
        # log p(t | x) + log p(j | x, t) is a joint log-probability over every seen class
        assert joint.shape == (len(xs), 3 * (i + 1))
        assert torch.allclose(joint.exp().sum(-1), torch.ones(len(xs)), atol=1e-4)
        if head_a is not None:
            assert not torch.equal(m.taskid_heads.heads["a"].weight, head_a)  # every alignment re-trains old tasks' heads
        head_a = m.taskid_heads.heads["a"].weight.detach().clone()
        save_store(m, tmp_path / "s")  # tasks 2 and 3 append log files: every re-trained head goes with them
        m = load_store(tmp_path / "s")
        assert m.config.cil_score == "aligned" and torch.equal(m.taskid_heads.heads["a"].weight, head_a)
        with torch.no_grad():
            assert torch.equal(m.cil_logits(xs), joint)
    assert m.head_numbers_per_task() >= 3 * 32 * 33 + 3 * 33  # statistics and identification head count as head bytes
    m.learn(make_task("d", seed=3), fast_cfg, progress=False)  # an aligned model aligns every new task (store `learn`)
    assert "d" in m.taskid_heads and "d" in m.class_stats and m.cil_logits(xs).shape == (len(xs), 12)
    # cil_top_tasks: each input runs only under its m most likely tasks; those tasks' scores are the full ones
    calls, encode = [], m.encoder.encode
    m.encoder.encode = lambda batch: calls.append(len(batch["input_ids"])) or encode(batch)
    with torch.no_grad():
        full = m.cil_logits(xs)
        assert calls == [len(xs), 4 * len(xs)]  # the base model once, then every input under every task, in one batch
        m.config.cil_top_tasks = 2
        gated = m.cil_logits(xs)
        assert calls[2:] == [len(xs), 2 * len(xs)]  # 1 + m forwards: the base model, then each input's two tasks
    del m.encoder.encode
    mass = full.exp().reshape(len(xs), 4, 3).sum(-1)  # p(t | x): the joint summed over each task's classes
    kept = torch.isfinite(gated).reshape(len(xs), 4, 3)
    assert kept.all(-1).sum(-1).eq(2).all() and kept.any(-1).eq(kept.all(-1)).all()  # two whole tasks per input
    assert torch.equal(kept.all(-1), torch.zeros_like(kept.all(-1)).scatter(1, mass.topk(2, -1).indices, True))
    assert torch.allclose(gated[torch.isfinite(gated)], full[torch.isfinite(gated)], atol=1e-5)
    with pytest.raises(ValueError, match="cil_top_tasks"):
        m.cil_logits(xs, score="prototype")
    with pytest.raises(ValueError, match="cil_top_tasks"):
        ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, k=4, cil_top_tasks=0)
    m.config.cil_top_tasks = None
    with pytest.raises(ValueError, match="choose one"):
        ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, k=4, cil_score="mahalanobis").learn(
            tasks[0], aligned_cfg, progress=False)
    with pytest.raises(ValueError, match="without --align"):
        plain.cil_logits(xs, score="aligned")
    with pytest.raises(ValueError, match="base model's features"):
        m.cil_logits(xs, score="mahalanobis")


def test_align_on_a_task_incremental_stream_is_refused(tmp_path):
    from conftest import sharecl_in_process

    res = sharecl_in_process("run", "--stream", "text5", "--methods", "inflora", "--align", "--out", str(tmp_path / "r"), check=False)
    assert res.returncode != 0 and "task-incremental" in res.stdout + res.stderr
    res = sharecl_in_process("compare", "--stream", "wordnet-cil", "--methods", "inflora", "--align-rank", "4", "--out", str(tmp_path / "r"),
                             check=False)
    assert res.returncode != 0 and "pass --align too" in res.stdout + res.stderr


def test_align_recompute_refreshes_old_statistics_with_the_data(tiny_model_dir, fast_cfg):
    from dataclasses import replace

    from conftest import make_task
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method

    tasks = [make_task("a"), make_task("b", seed=1)]
    kept, fresh = (build_method("seq-lora", load_encoder(tiny_model_dir, max_length=16), seed=0, r=4) for _ in range(2))
    for m, recompute in ((kept, False), (fresh, True)):
        for t in tasks:
            m.learn(t, replace(fast_cfg, align=True, align_steps=2, align_samples=4, align_recompute=recompute), progress=False)
    # same training, so task b's statistics agree; task a's were taken before SeqLoRA trained on b, unless recomputed
    assert torch.allclose(kept.class_stats["b"][0], fresh.class_stats["b"][0], atol=1e-5)
    assert not torch.allclose(kept.class_stats["a"][0], fresh.class_stats["a"][0], atol=1e-4)
    with torch.no_grad():
        feats = fresh.cil_features(tasks[0].train_inputs)
    labels = torch.tensor(tasks[0].train_labels)
    assert torch.allclose(fresh.class_stats["a"][0][0], feats[labels == 0].mean(0), atol=1e-5)


def test_max_class_log_likelihood_matches_torch_distributions():
    from torch.distributions import MultivariateNormal

    from sharecl.align import max_class_log_likelihood, pooled_gaussian

    g = torch.Generator().manual_seed(4)
    means = torch.randn(3, 5, generator=g)
    a = torch.randn(3, 5, 5, generator=g)
    covs = a @ a.transpose(1, 2) + torch.eye(5)
    z = torch.randn(7, 5, generator=g)
    gauss = pooled_gaussian(means, covs, shrink=0.0)
    sigma = covs.double().mean(0)
    want = torch.stack([MultivariateNormal(means[c].double(), sigma).log_prob(z.double()) for c in range(3)]).max(0).values
    assert torch.allclose(max_class_log_likelihood(z, gauss) - 2.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)),
                          want, atol=1e-8)


def test_share_mahalanobis_task_identification_survives_the_store(tiny_model_dir, fast_cfg, tmp_path):
    from conftest import make_task
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.store import load_store, save_store

    tasks = [make_task("a"), make_task("b", seed=1)]
    xs = [x for t in tasks for x in t.test_inputs]
    m = ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4, cil_score="mahalanobis")
    m.begin_stream(None)
    for i, t in enumerate(tasks):
        m.learn(t, fast_cfg, progress=False)
        assert m.class_stats[t.name][1].shape == (3, 32, 32)
        with torch.no_grad():
            want, proto = m.cil_logits(xs), m.cil_logits(xs, score="prototype")  # the same models, two rules
        assert want.shape == (len(xs), 3 * (i + 1)) and not torch.equal(want, proto)
        save_store(m, tmp_path / "s")  # task 2 appends a log file: its statistics go with its head
        m = load_store(tmp_path / "s")
        with torch.no_grad():
            assert torch.equal(m.cil_logits(xs), want)
    plain = ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4)
    plain.learn(tasks[0], fast_cfg, progress=False)
    with pytest.raises(ValueError, match="no class statistics"):
        plain.cil_logits(xs, score="mahalanobis")
