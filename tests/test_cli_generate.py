"""Generation stores from the shell on the tiny Llama: learn, generate, export to PEFT and back,
add-adapter (subsets, rsLoRA, base-model checks), kinds refused, and `sharecl serve` over HTTP."""

import json
import shutil

import pytest
import torch

from conftest import make_task, serving, sharecl_in_process, tiny_generation_task, write_csv, write_jsonl
from sharecl.store import load_store, read_manifest


def _files(store):
    return {f.name: f.read_bytes() for f in store.iterdir() if f.is_file() and f.name != ".lock"}


@pytest.fixture(scope="module")
def gen_store(tmp_path_factory, tiny_lm_dir):
    """`sharecl learn` twice on the tiny Llama: alpha → "yes", beta → "no" (chat-form JSONL)."""
    d = tmp_path_factory.mktemp("cli-gen")
    a = tiny_generation_task("alpha", "yes")
    write_jsonl(d / "alpha.jsonl", a.train_inputs + a.test_inputs)
    b = tiny_generation_task("beta", "no")
    with open(d / "beta.jsonl", "w") as fh:
        for p, c in b.train_inputs + b.test_inputs:
            fh.write(json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]}) + "\n")
    common = ["--steps", 30, "--batch-size", 8, "--lr", 1e-2, "-r", 4, "--no-progress"]
    out = sharecl_in_process("learn", d / "store", "--task", "alpha", "--data", d / "alpha.jsonl", "--model", tiny_lm_dir, "--k", 8,
                  "--p", 2, "--metric", "exact-match", "--max-new-tokens", 5, *common)
    assert "learned alpha" in out.stdout and "held-out exact-match" in out.stdout and "store version 1" in out.stdout
    sharecl_in_process("learn", d / "store", "--task", "beta", "--data", d / "beta.jsonl", *common)
    return d


def test_generate_prints_each_task_answers(gen_store):
    store = gen_store / "store"
    m = load_store(store)
    assert m.task_names == ["alpha", "beta"] and read_manifest(store)["modality"] == "lm"
    for task, word in (("alpha", "yes"), ("beta", "no")):
        prompts = [p for p, _ in tiny_generation_task(task, word).test_inputs[:3]]
        out = sharecl_in_process("generate", store, "--task", task, "--max-new-tokens", 5, "--json", *prompts).stdout
        rows = [json.loads(line) for line in out.strip().splitlines()]
        with m.task(task):
            want = m.encoder.generate(prompts, max_new_tokens=5)
        assert [r["text"] for r in rows] == want and [r["prompt"] for r in rows] == prompts
        assert sum(t.startswith(word) for t in want) >= 2  # learned from the shell
    info = sharecl_in_process("info", store).stdout
    assert "generation" in info and "tokenizer sha256" in info
    refused = sharecl_in_process("predict", store, "--task", "alpha", "x", check=False)
    assert refused.returncode == 1 and "sharecl generate" in refused.stderr


def test_data_of_the_other_kind_is_refused_before_anything_changes(gen_store, tmp_path, tiny_model_dir):
    store = tmp_path / "store"
    shutil.copytree(gen_store / "store", store)
    before = _files(store)
    csv = write_csv(tmp_path / "c.csv", make_task("c"))
    r = sharecl_in_process("learn", store, "--task", "c", "--data", csv, "--no-progress", check=False)
    assert r.returncode == 1 and "text classification data" in r.stderr and "generation" in r.stderr
    assert _files(store) == before
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod
    from sharecl.store import save_store
    from sharecl.train import TrainConfig

    text_store = tmp_path / "text-store"
    text = ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, p=2, k=4)
    text.learn(make_task("c"), TrainConfig(steps=2, batch_size=8, max_length=16), progress=False)
    save_store(text, text_store)
    before = _files(text_store)
    r = sharecl_in_process("learn", text_store, "--task", "g", "--data", gen_store / "alpha.jsonl", "--no-progress", check=False)
    assert r.returncode == 1 and "generation (prompt/completion) data" in r.stderr and "text classification tasks" in r.stderr
    assert _files(text_store) == before
    r = sharecl_in_process("generate", text_store, "--task", "c", "x", check=False)
    assert r.returncode == 1 and "sharecl predict" in r.stderr
    r = sharecl_in_process("learn", tmp_path / "new", "--task", "g", "--data", gen_store / "alpha.jsonl", "--model", tiny_model_dir,
                "--no-progress", check=False)
    assert r.returncode == 1 and "is not a causal LM" in r.stderr and not (tmp_path / "new" / "manifest.json").exists()


def test_export_loads_in_peft_and_generates_the_same_tokens(gen_store, tmp_path, tiny_lm_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sharecl.generation.lm import CausalLM

    store = gen_store / "store"
    m = load_store(store)
    for task, word in (("alpha", "yes"), ("beta", "no")):
        sharecl_in_process("export", store, tmp_path / task, "--task", task)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), str(tmp_path / task)).eval()
        lm = CausalLM(peft, m.encoder.tokenizer, tiny_lm_dir, max_length=m.encoder.max_length, chat=True)
        prompts = [p for p, _ in tiny_generation_task(task, word).test_inputs]
        with m.task(task):
            want = m.encoder.generate_ids(prompts, max_new_tokens=6)
        assert lm.generate_ids(prompts, max_new_tokens=6) == want  # token for token


def test_add_adapter_folds_a_subset_rslora_adapter_exactly(gen_store, tmp_path, tiny_lm_dir):
    """A PEFT LoRA trained elsewhere on the same base: rsLoRA scaling, another lora_alpha, on q_proj
    only. Folded where the basis has room, its ΔW is the adapter's own; v_proj gets none."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    store = tmp_path / "store"
    shutil.copytree(gen_store / "store", store)
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
                           LoraConfig(r=2, lora_alpha=5, use_rslora=True, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "q-lora")
    cfg = json.loads((tmp_path / "q-lora" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_lm_dir
    out = sharecl_in_process("add-adapter", store, tmp_path / "q-lora", "--task", "q-only", "--any-rank").stdout
    assert "2 target layer(s) not in the adapter get no update" in out
    m = load_store(store)
    i = m.index("q-only")
    for name, layer in m.layers.items():
        if "q_proj" in name:
            mod = model.base_model.model.get_submodule(name)
            want = (5 / 2 ** 0.5) * mod.lora_B["default"].weight @ mod.lora_A["default"].weight
            torch.testing.assert_close(layer.delta_weight(i), want, rtol=1e-4, atol=1e-6)
        else:
            assert float(layer.delta_weight(i).abs().max()) == 0.0


def test_add_adapter_refuses_another_base_model(gen_store, tmp_path, tiny_lm_dir):
    from conftest import tiny_lm

    store = tmp_path / "store"
    shutil.copytree(gen_store / "store", store)
    before = _files(store)
    other = tmp_path / "other-llama"
    lm = tiny_lm(seed=1)  # same shapes, other weights
    lm.model.save_pretrained(other)
    lm.tokenizer.save_pretrained(other)
    sharecl_in_process("export", store, tmp_path / "exp", "--task", "alpha")
    cfg_path = tmp_path / "exp" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    for base, expect in ((str(other), "whose weights differ"), ("HuggingFaceTB/SmolLM2-135M-Instruct", "--trust-base")):
        cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
        r = sharecl_in_process("add-adapter", store, tmp_path / "exp", "--task", "alpha2", "--any-rank", check=False)
        assert r.returncode == 1 and expect in r.stderr, r.stderr
        assert _files(store) == before
    out = sharecl_in_process("add-adapter", store, tmp_path / "exp", "--task", "alpha2", "--any-rank", "--trust-base").stdout
    assert "folded" in out and load_store(store).task_names == ["alpha", "beta", "alpha2"]


@pytest.mark.multiprocess
def test_sharecl_serve_generates_over_http(gen_store):
    import httpx

    store = gen_store / "store"
    prompts = [p for p, _ in tiny_generation_task("beta", "no").test_inputs[:2]]
    want = [json.loads(line)["text"] for line in
            sharecl_in_process("generate", store, "--task", "beta", "--max-new-tokens", 5, "--json", *prompts).stdout.strip().splitlines()]
    with serving(store) as url:
        r = httpx.post(f"{url}/generate", json={"task": "beta", "inputs": prompts, "max_new_tokens": 5}, timeout=30)
        assert r.status_code == 200 and [g["text"] for g in r.json()["generations"]] == want
        r = httpx.post(f"{url}/generate", json={"task": "beta", "inputs": prompts, "max_new_tokens": 10 ** 6}, timeout=30)
        assert r.status_code == 422
