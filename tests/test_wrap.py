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


@pytest.mark.parametrize("config", [ShareConfig(k=8, p=2, r=2, target_modules=["q_proj", "v_proj"]), InfLoRAConfig(), SDLoRAConfig(),
                                    LoRAConfig()],
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


def test_param_groups_train_each_group_at_its_methods_rate():
    """``cl.param_groups()``: an optimiser built from it gives Share's coefficients on a causal LM
    their 10x rate (SHARE_DEFAULTS["lm"]); the flat list of ``begin_task`` trains all at one rate.
    Adam's first step moves each element with a gradient by exactly its rate (m / sqrt(v) = ±1)."""
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]

    def first_step_sizes(use_groups: bool) -> set[float]:
        lm = tiny_lm()
        cl = sharecl.wrap(lm.model, ShareConfig(k=8, r=2))
        with pytest.raises(RuntimeError, match="begin_task"):
            cl.param_groups()
        _train(lm.model, cl.begin_task(tasks[0].name), _batches(lm, tasks[0]), steps=5)
        cl.end_task()
        params = cl.begin_task(tasks[1].name, lr=1e-3)
        groups = cl.param_groups()
        assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in params}
        opt = torch.optim.AdamW(groups if use_groups else params, lr=1e-3, weight_decay=0.0)
        before = [p.detach().clone() for p in params]
        lm.model(**_batches(lm, tasks[1])[0]).loss.backward()
        opt.step()
        return {round(float((p.detach() - b).abs().max()), 6) for p, b in zip(params, before)} - {0.0}

    assert first_step_sizes(use_groups=True) == {1e-2}  # the new directions' first gradient comes at step 2
    assert first_step_sizes(use_groups=False) == {1e-3}


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


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """The tiny Llama saved as a transformers directory: a model the user loads by path."""
    d = tmp_path_factory.mktemp("llama")
    lm = tiny_lm()
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return d


def _config_of(name: str):
    from sharecl.methods import METHODS

    opts = {"share": {"k": 8, "p": 2, "r": 2}}.get(name, {"r": 2})
    return METHODS[name].config_class(**opts)


STORE_METHODS = ["share", "inflora", "sd-lora", "sd-lora-rr", "sd-lora-kd", "dual-lora"]


@pytest.mark.parametrize("name", STORE_METHODS)
def test_wrapped_model_saves_reloads_learns_again_and_reloads_bit_exactly(name, llama_dir, tmp_path):
    """The user's model and loop: learn two tasks, save_pretrained, from_pretrained (the store's base model
    loaded by sharecl, and the user's own), learn a third on the reloaded model, save, reload: every task's
    greedy answers and per-task losses are identical after every reload."""
    from transformers import AutoModelForCausalLM

    from sharecl.store import STORABLE

    assert set(STORE_METHODS) == set(STORABLE)
    lm = tiny_lm()  # its tokenizer builds the batches; the model trained is the one loaded from llama_dir
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    cl = sharecl.wrap(model, _config_of(name), method=name)
    tasks = [tiny_generation_task(n, a) for n, a in (("ask", "yes"), ("tell", "no"), ("say", "maybe"))]

    def learn(cl, model, task):
        batches = _batches(lm, task)
        _train(model, cl.begin_task(task.name, data=batches), batches, steps=15)
        cl.end_task()

    def snapshot(cl, model, upto):
        out = {}
        for t in tasks[:upto]:
            b = lm.tokenize(t.test_inputs)
            with cl.task(t.name), torch.no_grad():
                ids = model.generate(input_ids=b["input_ids"][:2, :6], max_new_tokens=3, do_sample=False).tolist()
                out[t.name] = (model(**b).loss.item(), ids)
        return out

    for t in tasks[:2]:
        learn(cl, model, t)
    want = snapshot(cl, model, 2)
    cl.save_pretrained(tmp_path / "store")
    again = sharecl.from_pretrained(tmp_path / "store")  # sharecl loads the base model from the manifest
    assert again.tasks == ["ask", "tell"] and snapshot(again, again.model, 2) == want
    mine = AutoModelForCausalLM.from_pretrained(llama_dir)
    cl2 = sharecl.from_pretrained(tmp_path / "store", model=mine)  # the user's model, checked by its weights' hash
    assert snapshot(cl2, mine, 2) == want
    learn(cl2, mine, tasks[2])
    want3 = snapshot(cl2, mine, 3)
    cl2.save_pretrained(tmp_path / "store")
    third = sharecl.from_pretrained(tmp_path / "store")
    assert third.tasks == ["ask", "tell", "say"] and snapshot(third, third.model, 3) == want3


def test_save_pretrained_and_from_pretrained_refuse_what_they_cannot_keep(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sharecl.store import StoreError

    cl = sharecl.wrap(tiny_lm().model, ShareConfig(k=8, p=2, r=2))  # built in memory: no directory names it
    with pytest.raises(ValueError, match="save it first"):
        cl.save_pretrained(tmp_path / "s")
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    cl = sharecl.wrap(model, ShareConfig(k=8, p=2, r=2))
    cl.begin_task("ask")
    with pytest.raises(RuntimeError, match="still being learned"):
        cl.save_pretrained(tmp_path / "s")
    cl.end_task()
    cl.save_pretrained(tmp_path / "s")
    other = tiny_lm(seed=1).model  # another model: not the store's base
    with pytest.raises(StoreError, match="not the base model"):
        sharecl.from_pretrained(tmp_path / "s", model=other)


@pytest.mark.multiprocess
def test_a_store_saved_from_the_users_loop_answers_from_the_shell(llama_dir, tmp_path):
    import json

    from transformers import AutoModelForCausalLM

    from conftest import sharecl as cli
    from sharecl.generation.lm import load_causal_lm

    lm = load_causal_lm(llama_dir)  # the same model by path: its tokenizer and chat template frame the prompts
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    lm.model = model
    cl = sharecl.wrap(model, ShareConfig(k=8, p=2, r=2, target_modules=["q_proj", "v_proj"]))  # the loop's rate suits q/v
    task = tiny_generation_task("ask", "yes")
    batches = _batches(lm, task)
    _train(model, cl.begin_task("ask"), batches, steps=40)
    cl.end_task()
    prompt = task.test_inputs[0][0]
    with cl.task("ask"):
        mine = lm.generate([prompt], max_new_tokens=4)[0]
    cl.save_pretrained(tmp_path / "store")
    out = cli("generate", tmp_path / "store", prompt, "--task", "ask", "--max-new-tokens", "4", "--json", "--precision", "fp32")
    assert json.loads(out.stdout.strip().splitlines()[-1])["text"] == mine == "yes"
    cli("export", tmp_path / "store", tmp_path / "ask-lora", "--task", "ask")
    assert (tmp_path / "ask-lora" / "adapter_config.json").exists()


def test_wrap_takes_a_local_path(llama_dir, tiny_model_dir):
    cl = sharecl.wrap(str(llama_dir), ShareConfig(k=8, p=2, r=2))
    assert cl.method.modality == "lm" and len(cl.method.layers) == 2 * 7 and cl.model is cl.method.encoder.model  # all linear
    enc = sharecl.wrap(tiny_model_dir, InfLoRAConfig(r=2))
    assert enc.method.modality == "text" and enc.method.encoder.tokenizer is not None


def test_a_mixed_task_batch_through_the_users_model(llama_dir):
    """``with cl.mixed(names)``: one forward of the user's model computes each row for its own task."""
    from transformers import AutoModelForCausalLM

    lm = tiny_lm()
    model = AutoModelForCausalLM.from_pretrained(llama_dir)
    cl = sharecl.wrap(model, ShareConfig(k=8, p=2, r=2))
    for name, answer in (("ask", "yes"), ("tell", "no")):
        batches = _batches(lm, tiny_generation_task(name, answer))
        _train(model, cl.begin_task(name), batches, steps=10)
        cl.end_task()
    batch = lm.tokenize(tiny_generation_task("ask", "yes").test_inputs[:2] + tiny_generation_task("tell", "no").test_inputs[:2])
    names = ["ask", "ask", "tell", "tell"]
    with cl.mixed(names), torch.no_grad():
        mixed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, t in enumerate(names):
        with cl.task(t), torch.no_grad():
            alone = model(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits[0]
        torch.testing.assert_close(mixed[i], alone, atol=1e-4, rtol=1e-4)
    with pytest.raises(KeyError):
        cl.mixed(["nope"])
