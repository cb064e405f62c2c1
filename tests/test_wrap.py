"""``sharecl.wrap`` on a user's own HF causal LM: a plain loop and ``transformers.Trainer``."""

from __future__ import annotations

import pytest
import torch

import sharecl
from conftest import tiny_generation_task, tiny_lm
from sharecl.methods import InfLoRAConfig, LoRAConfig, SDLoRAConfig, ShareConfig


def _batches(lm, task, size=8):
    pairs = task.train_inputs
    return [lm.tokenize(pairs[i: i + size]) for i in range(0, len(pairs), size)]


def _train(model, params, batches, steps=60, lr=3e-2):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for step in range(steps):
        out = model(**batches[step % len(batches)])  # HF's own causal-LM loss on the labels (-100 masked)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


def _answers(lm, prompts):
    return lm.generate(prompts, max_new_tokens=5)


@pytest.mark.parametrize("config", [ShareConfig(k=8, p=2, r=2), InfLoRAConfig(), SDLoRAConfig(), LoRAConfig()],
                         ids=["share", "inflora", "sd-lora", "lora-per-task"])
def test_wrap_with_own_loop_learns_two_tasks(config):
    lm = tiny_lm()
    model = lm.model  # "already loaded" by the user
    cl = sharecl.wrap(model, config)
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]
    prompts = {t.name: [p for p, _ in t.test_inputs] for t in tasks}
    first = None
    for t in tasks:
        batches = _batches(lm, t)
        params = cl.begin_task(t.name, data=batches)
        assert params and all(p.requires_grad for p in params)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable <= {id(p) for p in params}  # only the task's tensors train (SD-LoRA's magnitudes live beside the model)
        losses = _train(model, params, batches)
        assert losses[-1] < losses[0] / 3
        if isinstance(config, SDLoRAConfig):
            # SD-LoRA's function moves when a task ends (per-layer unit directions, one magnitude for all
            # layers: METHODS.md §3); the trained function answers, and the stored one keeps most of it
            got = _answers(lm, prompts[t.name])
            cl.end_task()
            with cl.task(t.name), torch.no_grad():
                after = sum(model(**b).loss.item() for b in batches) / len(batches)
            assert after < losses[0] / 2, (after, losses[0])
        else:
            cl.end_task()
            with cl.task(t.name):
                got = _answers(lm, prompts[t.name])
        assert sum(a == t.test_inputs[0][1] for a in got) >= len(got) - 2, got  # most unseen prompts answered
        first = got if first is None else first
    assert cl.tasks == ["ask", "tell"]
    if isinstance(config, (ShareConfig, LoRAConfig)):  # task-aware methods keep the first task (k ≥ T·p: no truncation)
        with cl.task("ask"):
            assert _answers(lm, prompts["ask"]) == first


def test_wrap_errors_are_clear():
    lm = tiny_lm()
    cl = sharecl.wrap(lm.model, InfLoRAConfig())
    with pytest.raises(ValueError, match="pass data="):
        cl.begin_task("a")
    with pytest.raises(RuntimeError, match="begin_task"):
        cl.end_task()
    with pytest.raises(TypeError, match="no sharecl method takes"):
        sharecl.wrap(tiny_lm().model, {"k": 4})
    cl2 = sharecl.wrap(tiny_lm().model, ShareConfig(k=8, p=2, r=2))
    cl2.begin_task("a")
    with pytest.raises(RuntimeError, match="still being learned"):
        cl2.begin_task("b")
    with pytest.raises(KeyError, match="unknown task"):
        with cl2.task("nope"):
            pass


def test_wrap_trains_through_hf_trainer(tmp_path):
    """Share wrapped around a tiny Llama, each task trained by ``transformers.Trainer``."""
    from transformers import Trainer, TrainingArguments

    lm = tiny_lm()
    model = lm.model
    cl = sharecl.wrap(model, ShareConfig(k=8, p=2, r=2))
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]

    class Pairs(torch.utils.data.Dataset):
        def __init__(self, pairs):
            self.pairs = pairs

        def __len__(self):
            return len(self.pairs)

        def __getitem__(self, i):
            return self.pairs[i]

    def collate(pairs):
        return lm.tokenize(pairs)

    for t in tasks:
        cl.begin_task(t.name)
        args = TrainingArguments(output_dir=str(tmp_path / t.name), max_steps=40, per_device_train_batch_size=8,
                                 learning_rate=3e-2, lr_scheduler_type="constant", warmup_steps=0, logging_steps=5,
                                 save_strategy="no", report_to=[], use_cpu=True, seed=0, remove_unused_columns=False,
                                 disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Pairs(t.train_inputs), data_collator=collate)
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert logged[-1] < logged[0] / 3, logged
        info = cl.end_task()
        assert info["merge"]["after_task"] == t.name
    for t in tasks:
        with cl.task(t.name):
            got = _answers(lm, [p for p, _ in t.test_inputs])
        assert sum(a == t.test_inputs[0][1] for a in got) >= len(got) - 1, (t.name, got)
