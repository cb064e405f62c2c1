"""Share-full (METHODS.md §5): Share plus, after every merge, each old task's coefficients
fine-tuned on its own data. Until the second task's merge it is Share, step for step."""

import torch
from torch.nn import functional as F

from conftest import make_task


def _train_loss(method, task) -> float:
    with torch.no_grad():
        logits = method.logits(task.train_inputs, task.name)
    return F.cross_entropy(logits, torch.tensor(task.train_labels)).item()


def test_old_tasks_are_fine_tuned_after_each_merge_and_the_new_one_is_shares(tiny_model_dir, fast_cfg):
    from sharecl.backbone import load_encoder
    from sharecl.methods import build_method

    opts = {"r": 4, "lora_alpha": 8, "p": 2, "k": 3, "phi": 2}  # k < T·p: the merge truncates, old tasks drift
    share = build_method("share", load_encoder(tiny_model_dir, max_length=16), seed=0, **opts)
    full = build_method("share-full", load_encoder(tiny_model_dir, max_length=16), seed=0, old_task_steps=15, **opts)
    a, b = make_task("a"), make_task("b", seed=1)
    for m in (share, full):
        m.learn(a, fast_cfg, progress=False)
    assert torch.equal(full.logits(a.test_inputs, "a"), share.logits(a.test_inputs, "a"))  # no old task yet
    for m in (share, full):
        m.learn(b, fast_cfg, progress=False)
    assert share.drift[-1]["per_task"]["a"]["max"] > 1e-3  # Share's merge moved task a
    # the new task is exactly Share's; the old one was trained further on its own data
    assert torch.equal(full.logits(b.test_inputs, "b"), share.logits(b.test_inputs, "b"))
    assert _train_loss(full, a) < _train_loss(share, a) - 1e-3
    assert torch.equal(full.heads.heads["a"].weight, share.heads.heads["a"].weight)  # heads stay as learned
    assert not full.storable and full.config.to_dict()["old_task_steps"] == 15
