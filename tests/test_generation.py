"""Generation tasks on a tiny random causal LM: the masked loss, scoring, data files, every
method learning, folded vs routed generation, and the merge's recorded drift."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_generation_task, tiny_lm
from sharecl.generation.scoring import exact_match, normalize_answer, rouge_l
from sharecl.generation.tasks import GenerationDataError, GenerationTask, read_pairs, split_pairs
from sharecl.methods import METHODS, build_method
from sharecl.train import TrainConfig

CFG = TrainConfig(steps=25, batch_size=8, lr=3e-2, eval_batch_size=8, max_length=64)


def _target_nll(lm, prompt: str, target: str) -> tuple[float, int]:
    """Sum of −log p(target token) and the token count, one example at a time, no padding: an
    independent path to the masked loss (prompt ids, then target ids and EOS, scored by hand)."""
    p = lm._prompt_ids(prompt)
    t = lm.tokenizer(target, add_special_tokens=False)["input_ids"] + [lm.eos_id]
    ids = torch.tensor([p + t])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].double(), -1)
    return -sum(logp[len(p) - 1 + i, tok].item() for i, tok in enumerate(t)), len(t)


def test_masked_loss_counts_target_tokens_only():
    lm = tiny_lm()
    examples = [("short q?", "yes"), ("a much longer prompt here?", "no way"), ("x", "abc def")]
    batch = lm.tokenize(examples)
    assert (batch["labels"] != -100).sum().item() == sum(len(t) + 1 for _, t in examples)  # targets + EOS, nothing else
    with torch.no_grad():
        got = lm.loss(batch).item()
    nll, n = zip(*(_target_nll(lm, p, t) for p, t in examples))
    assert got == pytest.approx(sum(nll) / sum(n), rel=1e-5)
    # changing a prompt token changes the conditioning but is never itself a predicted target
    labels = batch["labels"][0]
    first_target = int((labels != -100).nonzero()[0])
    assert (labels[:first_target] == -100).all()


def test_scoring_follows_squad_and_rouge_score():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("An apple.", "apple") == 1.0 and exact_match("apples", "apple") == 0.0
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 1, R = 3/6, F1 = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert rouge_l("dogs running", "the dog runs") == pytest.approx(2 * (1.0 * 2 / 3) / (1.0 + 2 / 3))  # stemmer on
    assert rouge_l("", "anything") == 0.0


def test_generation_files_prompt_completion_and_chat(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    (tmp_path / "pc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_pairs(tmp_path / "pc.jsonl")[3] == ("q3", "a3")
    chat = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    assert read_pairs(tmp_path / "chat.jsonl")[1] == ("q1", "a1")
    (tmp_path / "pc.csv").write_text("prompt,completion\nhello,world\nfoo,bar\n")
    assert read_pairs(tmp_path / "pc.csv") == [("hello", "world"), ("foo", "bar")]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": "y"}))
    with pytest.raises(GenerationDataError, match="needs 'prompt' and 'completion'"):
        read_pairs(tmp_path / "bad.jsonl")
    wrong = [{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]}]
    (tmp_path / "wrong.jsonl").write_text(json.dumps(wrong[0]))
    with pytest.raises(GenerationDataError, match="assistant's answer"):
        read_pairs(tmp_path / "wrong.jsonl")
    task = split_pairs("t", read_pairs(tmp_path / "pc.jsonl") * 2, seed=0, train_size=None, test_size=3)
    assert len(task.test_inputs) == 3 and len(task.train_inputs) == 7  # duplicates kept once
    assert not {p for p, _ in task.test_inputs} & {p for p, _ in task.train_inputs}
    with pytest.raises(ValueError, match="metric"):
        GenerationTask("t", [("a", "b")], [], metric="bleu")


GEN_METHODS = sorted(m for m in METHODS if "generation" in METHODS[m].task_kinds and not getattr(METHODS[m], "joint", False))


def test_share_lm_defaults_learn_a_later_task_as_fast_as_lora():
    """Issue 30: on causal LMs Share's coefficients train at 10x the rate, on every linear layer
    (SHARE_DEFAULTS["lm"]). At a rate where LoRA per task (q/v) learns slowly, Share on q/v at the
    encoders' ratio 1 barely moves on the second task (its only new parameters are the k x p
    coefficients); at the lm defaults it reaches LoRA's training loss on the same budget.
    Measured: LoRA 1.60, defaults 0.38 (1.28 with p 4 on q/v), q/v at ratio 1 3.53 (2.67 with p 4)."""
    cfg = TrainConfig(steps=25, batch_size=8, lr=3e-3, eval_batch_size=8, max_length=64)
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]

    def second_task_loss(name, **opts):
        m = build_method(name, tiny_lm(), seed=0, **opts)
        m.begin_stream(2)
        return [m.learn(t, cfg, progress=False)["final_loss"] for t in tasks][1]

    lora = second_task_loss("lora-per-task")
    default = second_task_loss("share", k=8, r=4)
    ratio1 = second_task_loss("share", k=8, r=4, coeff_lr_ratio=1.0, target_modules=["q_proj", "v_proj"])
    assert default < 1.1 * lora < ratio1


@pytest.mark.parametrize("name", GEN_METHODS)
def test_every_method_learns_two_generation_tasks(name):
    """Each method on the tiny Llama: the second task learned with its adapter routed, the scores
    fractions, the loss falling (a method that trains nothing — zero-shot — stays where it was)."""
    from sharecl.generation.evaluate import evaluate_generation

    lm = tiny_lm()
    # Share (and Share-full) at the coefficients' ratio 1: CFG's rate is tuned for the tiny model's LoRA, and the lm
    # family's ratio 10 (chosen on SmolLM2, d = 576) overshoots on this narrow model at that rate
    opts = {"share": {"k": 8, "p": 2, "r": 4, "coeff_lr_ratio": 1.0}, "share-full": {"p": 2, "coeff_lr_ratio": 1.0}}
    m = build_method(name, lm, seed=0, **opts.get(name, {}))
    m.begin_stream(2)
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]
    infos = [m.learn(t, CFG, progress=False) for t in tasks]
    scores = [evaluate_generation(m, t, 8)[0] for t in tasks]
    assert all(0.0 <= s <= 1.0 for s in scores)
    if name == "zero-shot":
        assert infos[0]["final_loss"] is None and scores == [0.0, 0.0]
    else:
        assert infos[1]["final_loss"] < 1.0, infos
        assert scores[1] == 1.0, scores  # the task just learned answers exactly


def test_joint_lora_learns_generation_tasks_at_once():
    from sharecl.generation.evaluate import evaluate_generation

    m = build_method("joint-lora", tiny_lm(), seed=0)
    tasks = [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")]
    info = m.learn_all(tasks, CFG, progress=False)
    assert info["final_loss"] < 1.0
    assert [evaluate_generation(m, t, 8)[0] for t in tasks] == [1.0, 1.0]


def test_share_folded_generation_equals_routed_generation():
    lm = tiny_lm()
    m = build_method("share", lm, seed=0, k=8, p=2, r=4, coeff_lr_ratio=1.0)  # ratio 1 at CFG's rate (see above)
    for t in (tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")):
        m.learn(t, CFG, progress=False)
    prompts = ["ask abcd?", "tell ffff?", "something else"]
    for name in m.task_names:
        with m.task(name):
            routed = lm.generate(prompts, max_new_tokens=6)
        folded = m.folded_model(name)
        swap = lm.model
        lm.model = folded
        try:
            got = lm.generate(prompts, max_new_tokens=6)
        finally:
            lm.model = swap
        assert got == routed, (name, got, routed)


def test_share_merge_moves_old_tasks_by_the_recorded_drift():
    """Task 1's ΔW after task 2's merge differs from before by exactly the drift Share records."""
    lm = tiny_lm()
    m = build_method("share", lm, seed=0, k=2, p=2, r=4)  # k = p: the second merge must truncate
    m.learn(tiny_generation_task("ask", "yes"), CFG, progress=False)
    before = {n: layer.delta_weight(0).clone() for n, layer in m.layers.items()}
    m.learn(tiny_generation_task("tell", "no"), CFG, progress=False)
    after = {n: layer.delta_weight(0) for n, layer in m.layers.items()}
    rel = [((after[n] - before[n]).norm() / before[n].norm()).item() for n in before]
    rec = m.drift[-1]["per_task"]["ask"]
    assert max(rel) > 1e-3  # the truncation did move task 1
    assert rec["max"] == pytest.approx(max(rel), rel=1e-3, abs=1e-6)
    assert rec["mean"] == pytest.approx(sum(rel) / len(rel), rel=1e-3, abs=1e-6)


def test_routing_is_per_thread():
    """Two threads generating for two tasks at once each get their own task's answer."""
    import threading

    lm = tiny_lm()
    m = build_method("share", lm, seed=0, k=8, p=2, r=4, coeff_lr_ratio=1.0)  # ratio 1 at CFG's rate (see above)
    for t in (tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")):
        m.learn(t, CFG, progress=False)
    prompts = ["ask qqqq?"] * 4
    want = {}
    for name in ("ask", "tell"):
        with m.task(name):
            want[name] = lm.generate(prompts, max_new_tokens=4)
    assert want["ask"] != want["tell"]
    got, barrier = {}, threading.Barrier(2)

    def run(name):
        with m.task(name):
            barrier.wait()
            got[name] = [lm.generate(prompts, max_new_tokens=4) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("ask", "tell")]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert got == {n: [want[n]] * 3 for n in want}


def test_runner_writes_score_matrix_for_a_generation_stream(tmp_path, monkeypatch):
    from sharecl import runner
    from sharecl.data.tasks import Stream
    from sharecl.store import load_store

    stream = Stream("tiny-gen", [tiny_generation_task("ask", "yes"), tiny_generation_task("tell", "no")], 0, "til", modality="lm")
    lm = tiny_lm()
    lm.model.save_pretrained(tmp_path / "model")  # a real directory, so the store can identify the base model
    lm.tokenizer.save_pretrained(tmp_path / "model")
    lm.path = str(tmp_path / "model")
    monkeypatch.setattr(runner, "load_backbone", lambda *a, **k: lm)
    res = runner.run_stream(stream, ["share", "zero-shot"], CFG, tmp_path, method_configs={"share": {"k": 8, "p": 2, "r": 4, "coeff_lr_ratio": 1.0,
                                                                                    "target_modules": ["q_proj", "v_proj"]}},
                            progress=False, log=lambda *a: None)
    share = json.loads((tmp_path / "share" / "results.json").read_text())
    assert share["metrics"] == {"ask": "exact-match", "tell": "exact-match"}
    assert share["accuracy_matrix"][1] == [1.0, 1.0] and share["fwt"] == 1.0
    assert share["sample_answers"]["ask"][0]["answer"] == "yes"
    assert res["zero-shot"]["final_average_accuracy"] == 0.0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["tasks"][0]["kind"] == "generation" and manifest["tasks"][0]["metric"] == "exact-match"
    # the store reloads on the causal LM and answers with the same tokens
    from sharecl.generation.evaluate import generate_answers

    loaded = load_store(tmp_path / "share" / "store")
    assert loaded.modality == "lm" and loaded.task_names == ["ask", "tell"]
    for task in stream.tasks:  # the answers recorded after the last task, regenerated from the reloaded store
        samples = share["sample_answers"][task.name]
        got = generate_answers(loaded, task.name, [x["prompt"] for x in samples], max_new_tokens=task.max_new_tokens)
        assert got == [x["answer"] for x in samples]


@pytest.mark.parametrize("name", [m for m in GEN_METHODS if METHODS[m].trains])
def test_every_method_adapts_all_linear(name):
    """PEFT's ``target_modules="all-linear"`` works for every method: each of the tiny Llama's 14
    linear layers but ``lm_head`` gets an adapter, and a training step moves the answers' loss."""
    lm = tiny_lm()
    m = build_method(name, lm, seed=0, target_modules="all-linear", **({"k": 8, "p": 2, "r": 4} if name == "share" else {}))
    m.begin_stream(1)
    task = tiny_generation_task("ask", "yes")
    info = m.learn(task, TrainConfig(steps=3, batch_size=8, lr=3e-2, max_length=64), progress=False)
    layers = getattr(m, "layers", None)
    adapted = (set(layers) if layers else
               {n.removeprefix("base_model.model.") for n, mod in lm.model.named_modules() if hasattr(mod, "lora_A")})
    assert len(adapted) == 14 and not any(n.endswith("lm_head") for n in adapted), sorted(adapted)
    assert info["final_loss"] is not None


def test_precision_auto_is_bf16_for_causal_lms_where_the_cpu_has_it():
    from pathlib import Path

    from sharecl.distributed import native_bf16, resolve_precision

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else None
    if flags is not None:  # an independent reading of the CPU's instruction sets
        assert native_bf16("cpu") == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)
    want = "bf16" if native_bf16("cpu") else "fp32"
    assert resolve_precision("auto", "cpu", "lm") == want
    assert resolve_precision("auto", "cpu", "text") == "fp32" and resolve_precision("auto", "cpu", "image") == "fp32"
    assert resolve_precision("fp32", "cpu", "lm") == "fp32" and resolve_precision("bf16", "cpu", "text") == "bf16"
    with pytest.raises(ValueError, match="--precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", "cpu", "lm")
