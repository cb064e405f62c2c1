"""Shared fixtures: a tiny random BERT saved as a real transformers directory, tiny tasks."""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    """Under pytest-xdist (``-n N``) each worker computes on one thread, and so do the interpreters
    its tests start: N workers on N cores, not N × cores threads fighting for them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 32) with random weights and the packaged MiniLM tokenizer."""
    from transformers import BertConfig, BertModel

    from sharecl.backbone import default_model_path

    d = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(d)
    src = default_model_path()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(src, f), d / f)
    return str(d)


def make_task(name: str, seed: int = 0, n_per_class: int = 12):
    """A small learnable text task: each class is marked by its own keyword."""
    import random

    from sharecl.data.tasks import split_task

    rng = random.Random(f"{name}{seed}")
    words = ["apple", "river", "engine", "violin", "planet", "garden"]
    rng.shuffle(words)
    filler = "the a of and to in is was for on with as by at".split()
    data = {}
    for c, w in enumerate(words[:3]):
        data[f"class{c}"] = [" ".join(rng.choices(filler, k=4) + [w] + rng.choices(filler, k=3)) for _ in range(n_per_class)]
    return split_task(name, data, seed=seed, train_per_class=None, test_per_class=4)


@pytest.fixture
def tiny_share(tiny_model_dir):
    """A fresh ShareMethod (k=4, p=2, r=4) on the tiny model."""
    from sharecl.backbone import load_encoder
    from sharecl.methods.share import ShareMethod

    return ShareMethod(load_encoder(tiny_model_dir, max_length=16), seed=0, r=4, lora_alpha=8, p=2, k=4, phi=2)


@pytest.fixture
def fast_cfg():
    from sharecl.train import TrainConfig

    return TrainConfig(steps=6, batch_size=8, lr=1e-2, head_lr=1e-2, max_length=16, eval_batch_size=16)


# -- the command line, for tests that drive `sharecl` as a user would ---------------------
def sharecl(*args, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-m", "sharecl", *map(str, args)], capture_output=True, text=True, env=env, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"sharecl {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def sharecl_in_process(*args, check=True):
    """``sharecl ARGS`` run in this interpreter (typer's CliRunner): the same exit code, stdout and
    stderr as :func:`sharecl` without the seconds a fresh interpreter takes to import torch."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from sharecl.cli import app

    r = CliRunner().invoke(app, [str(a) for a in args])
    out = SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)
    if check and r.exit_code != 0:
        raise AssertionError(f"sharecl {args} failed ({r.exit_code}):\n{r.stdout}\n{r.stderr}\n{r.exception!r}")
    return out


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(store, *args):
    """``sharecl serve STORE`` as a real process on a free loopback port; yields its URL once
    ``/health`` answers, and stops it on exit."""
    import time

    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sharecl", "serve", str(store), "--port", str(port), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def write_csv(path, task):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for x, y in zip(task.train_inputs + task.test_inputs, task.train_labels + task.test_labels):
            w.writerow([x, task.classes[y]])
    return path


@pytest.fixture(scope="session")
def cli_store(tmp_path_factory, tiny_model_dir):
    """A one-task Share store learned once per session by ``sharecl learn`` (in process); tests
    that write to a store copy ``cli_store / "store"`` first."""
    d = tmp_path_factory.mktemp("cli")
    a = write_csv(d / "a.csv", make_task("a"))
    sharecl_in_process("learn", d / "store", "--task", "a", "--data", a, "--model", tiny_model_dir, "--steps", 4, "-r", 4,
                       "--k", 4, "--p", 2, "--no-progress")
    return d


def learn_b(store, data_dir):
    b = write_csv(data_dir / "b.csv", make_task("b", seed=1))
    return ["learn", store, "--task", "b", "--data", b, "--steps", 40, "--no-progress"]


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory):
    """A 2-layer DINOv2 (hidden 32, patch 7) with random weights, as a transformers directory."""
    from transformers import Dinov2Config, Dinov2Model

    d = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, patch_size=7,
                             image_size=28)).save_pretrained(d)
    return str(d)


# -- a tiny random causal LM (Llama) with a character tokenizer, built in memory: no files -------
def tiny_lm(chat: bool = True, seed: int = 0, hidden: int = 32, layers: int = 2):
    """A fresh :class:`sharecl.generation.lm.CausalLM`: a random 2-layer Llama (hidden 32) and a
    character-level tokenizer with a small chat template; the same ``seed`` gives the same weights."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from sharecl.generation.lm import CausalLM

    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{c: i + 3 for i, c in enumerate(string.printable[:95])}}
    t = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    t.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=2, pad_token_id=1, tie_word_embeddings=True,
                      initializer_range=0.3)  # large enough weights that a frozen head can become confident
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return CausalLM(model, tok, "tiny-llama", max_length=64, chat=chat)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """:func:`tiny_lm` saved as a transformers directory (model, tokenizer, chat template): a
    causal LM the command line and stores load by path."""
    d = tmp_path_factory.mktemp("tiny-llama")
    lm = tiny_lm()
    lm.model.save_pretrained(d)
    lm.tokenizer.save_pretrained(d)
    return str(d)


def write_jsonl(path, pairs):
    """``(prompt, completion)`` pairs as a JSONL file with ``prompt``/``completion`` fields."""
    import json

    with open(path, "w") as fh:
        for p, c in pairs:
            fh.write(json.dumps({"prompt": p, "completion": c}) + "\n")
    return path


def tiny_generation_task(name: str, answer: str, n_train: int = 24, n_test: int = 6, metric: str = "exact-match"):
    """A learnable generation task: every prompt ``"<name> <word>?"`` has the answer ``answer``."""
    import random

    from sharecl.generation.tasks import GenerationTask

    rng = random.Random(name)
    words = ["".join(rng.choices("abcdefghij", k=4)) for _ in range(n_train + n_test)]
    pairs = [(f"{name} {w}?", answer) for w in words]
    return GenerationTask(name, pairs[:n_train], pairs[n_train:], metric=metric, max_new_tokens=len(answer) + 2)


def to_format1(path, edit=None):
    """Rewrite a checkpoint-only store (format 2) in the layout sharecl wrote before logs: one
    state file without ``__meta__``; tasks, merges and method state in the manifest. ``edit``
    ``(tensors, method_state)`` may change both first (older layouts of a method's tensors)."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file

    mf = json.loads((path / "manifest.json").read_text())
    assert not mf["files"]["log"], "fold the log first (save_store(..., compact=True))"
    state = path / mf["files"]["state"]["name"]
    tensors = load_file(str(state))
    meta = json.loads(tensors.pop("__meta__").numpy().tobytes().decode())
    if edit is not None:
        edit(tensors, meta["method_state"])
    state.unlink()
    state = path / "state-v1.safetensors"
    save_file(tensors, str(state), metadata={"format": "pt"})
    for key in ("task_count", "last_merge", "files"):
        mf.pop(key)
    mf.update(format_version=1, tasks=meta["tasks"], merges=meta["merges"], method_state=meta["method_state"],
              files={"state": {"name": state.name, "sha256": hashlib.sha256(state.read_bytes()).hexdigest()}})
    (path / "manifest.json").write_text(json.dumps(mf))
