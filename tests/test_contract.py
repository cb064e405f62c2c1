"""The contract every registered method keeps, checked over the registry (issue 32): a batch
mixing tasks answers as the tasks answer one by one, a storable method reloads bit-exactly,
and ``sharecl.wrap`` takes every trainable method's config. A new method is covered as soon as
it is registered."""

from __future__ import annotations

import pytest
import torch

import sharecl
from conftest import make_task, tiny_generation_task, tiny_lm
from sharecl.methods import METHODS, build_method
from sharecl.train import TrainConfig

CFG = TrainConfig(steps=6, batch_size=8, lr=1e-2, head_lr=1e-2, max_length=16, eval_batch_size=16)
SMALL = {"r": 4}  # every method with a rank: small, so the tiny models stay tiny


def _options(name: str) -> dict:
    import dataclasses

    cls = METHODS[name].config_class
    fields = {f.name for f in dataclasses.fields(cls)} if cls else set()
    opts = {k: v for k, v in SMALL.items() if k in fields}
    if "k" in fields:  # Share's family: a basis both tasks fit in
        opts.update(k=8, p=2)
    return opts


CLASSIFIERS = sorted(m for m, c in METHODS.items() if "classification" in c.task_kinds and not getattr(c, "joint", False))
GENERATORS = sorted(m for m, c in METHODS.items() if "generation" in c.task_kinds and not getattr(c, "joint", False))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_a_mixed_task_batch_answers_as_each_task_alone(name, tiny_model_dir):
    from sharecl.backbone import load_encoder

    m = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, **_options(name))
    m.begin_stream(2)
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        m.learn(t, CFG, progress=False)
    x = tasks[0].test_inputs[:3] + tasks[1].test_inputs[:3]
    names = ["a", "b", "a", "b", "b", "a"]
    mixed = m.mixed_logits(x, names)
    for row, (xi, t) in enumerate(zip(x, names)):
        alone = m.logits([xi], t)[0]
        torch.testing.assert_close(mixed[row], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", GENERATORS)
def test_a_mixed_task_generate_answers_as_each_task_alone(name):
    m = build_method(name, tiny_lm(), seed=0, **_options(name))
    m.begin_stream(2)
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]
    for t in tasks:
        m.learn(t, TrainConfig(steps=10, batch_size=8, lr=3e-2, max_length=64), progress=False)
    prompts = [p for p, _ in tasks[0].test_inputs[:2]] + [p for p, _ in tasks[1].test_inputs[:2]]
    names = ["ask", "ask", "tell", "tell"]
    mixed = m.mixed_generate(prompts, names, [4] * 4)
    for p, t, got in zip(prompts, names, mixed):
        assert got == m.mixed_generate([p], [t], [4])[0], (name, t)


@pytest.mark.parametrize("name", sorted(m for m, c in METHODS.items() if c.storable))
def test_a_storable_method_reloads_bit_exactly(name, tiny_model_dir, tmp_path):
    from sharecl.backbone import load_encoder
    from sharecl.store import load_store, save_store

    m = build_method(name, load_encoder(tiny_model_dir, max_length=16), seed=0, **_options(name))
    m.begin_stream(2)
    tasks = [make_task("a"), make_task("b", seed=1)]
    for t in tasks:
        m.learn(t, CFG, progress=False)
    save_store(m, tmp_path / "s")
    again = load_store(tmp_path / "s")
    assert again.name == name and again.task_names == m.task_names
    for t in tasks:
        assert torch.equal(again.logits(t.test_inputs, t.name), m.logits(t.test_inputs, t.name))


@pytest.mark.parametrize("name", sorted(m for m, c in METHODS.items() if c.trains and "generation" in c.task_kinds
                                         and not getattr(c, "joint", False)))
def test_wrap_takes_every_trainable_method(name):
    """``sharecl.wrap`` builds every trainable method from its config on a model the user loaded,
    and one task of the user's own loop moves its loss."""
    lm = tiny_lm()
    config = METHODS[name].config_class(**_options(name))
    cl = sharecl.wrap(lm.model, config, method=name)
    assert cl.method.name == name
    task = tiny_generation_task("ask", "yes")
    batches = [lm.tokenize(task.train_inputs[i: i + 8]) for i in range(0, len(task.train_inputs), 8)]
    params = cl.begin_task("ask", data=batches)
    opt = torch.optim.AdamW(params, lr=3e-2)
    losses = []
    for step in range(8):
        loss = lm.model(**batches[step % len(batches)]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    cl.end_task()
    assert losses[-1] < losses[0], (name, losses)
