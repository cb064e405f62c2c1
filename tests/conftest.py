"""Shared fixtures: a tiny random BERT saved as a real transformers directory, tiny tasks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
