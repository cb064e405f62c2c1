"""PEFT LoRA directories in and out.

A PEFT LoRA directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` with
keys ``base_model.model.<module>.lora_A.weight`` ``(r, d_in)`` and ``….lora_B.weight``
``(d_out, r)``; the update is ``(lora_alpha / r) · B @ A`` (or ``lora_alpha / √r`` with
``use_rslora``). Export writes the config with PEFT's own ``LoraConfig.save_pretrained``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["AdapterError", "LoRAAdapter", "read_lora_adapter", "check_adapter_base", "export_task"]

_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A PEFT adapter directory that cannot be used here; the message says why and what to do."""


class LoRAAdapter:
    """A LoRA adapter read from disk: ``factors[module] = (B (d_out, r), A (r, d_in))``, ``scaling`` s."""

    def __init__(self, factors: dict, scaling: float, rank: int, config: dict, path: str):
        self.factors, self.scaling, self.rank, self.config, self.path = factors, scaling, rank, config, path


def read_lora_adapter(path: str | Path) -> LoRAAdapter:
    """Read a PEFT LoRA adapter directory (safetensors only; pickled ``.bin`` files are refused).

    Raises:
        AdapterError: missing files, a non-LoRA adapter, unsupported options (DoRA,
            per-module ranks), unreadable tensors, or unpaired A/B factors.
    """
    p = Path(path)
    cfg_path, w_path = p / "adapter_config.json", p / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise AdapterError(f"{p} is not a PEFT adapter directory (no adapter_config.json)")
    if not w_path.is_file():
        hint = (" (found adapter_model.bin: sharecl never unpickles; re-save with safe_serialization=True)"
                if (p / "adapter_model.bin").exists() else "")
        raise AdapterError(f"{p} has no adapter_model.safetensors{hint}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{p} is a {cfg.get('peft_type')} adapter; only LoRA adapters can be folded into Share")
    if cfg.get("use_dora"):
        raise AdapterError(f"{p} is a DoRA adapter; its magnitude vector has no place in a shared LoRA subspace")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise AdapterError(f"{p} uses per-module rank/alpha patterns, which are not supported")
    r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"cannot read {w_path}: {exc}; the file is damaged or not safetensors") from exc
    A: dict = {}
    B: dict = {}
    for key, val in tensors.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        for tag, store in ((".lora_A.weight", A), (".lora_B.weight", B)):
            if name.endswith(tag):
                store[name[: -len(tag)]] = val
                break
    if not A or set(A) != set(B):
        raise AdapterError(f"{w_path}: lora_A/lora_B keys do not pair up (A: {len(A)}, B: {len(B)})")
    factors = {m: (B[m].float(), A[m].float()) for m in sorted(A)}
    return LoRAAdapter(factors, scaling, r, cfg, str(p))


def check_adapter_base(lora: LoRAAdapter, base: dict, *, trust: bool = False) -> str:
    """Check that ``lora`` was trained on a store's base model (the manifest's ``base_model``:
    ``path`` and the ``sha256`` of its weights); returns how it was checked.

    The adapter's ``base_model_name_or_path`` is verified where it can be: a local model
    directory by the sha256 of its weights, a local ``.gguf`` file by its own sha256 against the
    GGUF the store's base was dequantised from (``sharecl_source.json``). A name that is not a
    local path (a hub id) or no name at all cannot be verified: it is refused unless ``trust``.

    Returns:
        ``"sha256"`` (verified) or ``"trusted"`` (accepted unverified).

    Raises:
        AdapterError: the adapter's base differs from the store's, or cannot be verified and
            ``trust`` is False.
    """
    from sharecl.backbone import sha256_files, weights_hash

    name = lora.config.get("base_model_name_or_path")
    where = Path(name) if name else None
    if where is not None and where.is_dir():
        if weights_hash(where) != base["sha256"]:
            raise AdapterError(f"{lora.path} was trained on {name}, whose weights differ from this store's base model "
                               f"({base['path']}); fold only adapters trained on the store's base model")
        return "sha256"
    if where is not None and where.is_file() and where.suffix == ".gguf":
        try:
            source = json.loads((Path(base["path"]) / "sharecl_source.json").read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            source = None
        if source != sha256_files([where]):
            raise AdapterError(f"{lora.path} was trained on {name}, which is not the GGUF file this store's base model "
                               f"({base['path']}) was made from; fold only adapters trained on the store's base model")
        return "sha256"
    if trust:
        return "trusted"
    said = f"names its base model {name!r}, which is not a local path" if name else "does not name its base model"
    raise AdapterError(f"{lora.path} {said}, so sharecl cannot check that it was trained on this store's base model "
                       f"({base['path']}); pass --trust-base if you know it was (an adapter trained on another model "
                       f"of the same shapes would be folded without error and answer wrongly)")


def export_task(method, task_name: str, out_dir: str | Path) -> Path:
    """Write Share task ``task_name`` as a plain PEFT LoRA directory of rank ``p``.

    ``lora_A = A_t``, ``lora_B = B_t`` and ``lora_alpha = s · p`` so that PEFT's scaling
    ``lora_alpha / p`` equals Share's ``s``. The task head, if any, is written beside it as
    ``head.safetensors`` with ``classes.json`` (PEFT ignores both).

    Raises:
        KeyError: unknown task. FileExistsError: ``out_dir`` exists and is not empty.
    """
    from peft import LoraConfig

    idx = method.index(task_name)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    p = method.config.p
    modules = sorted(method.layers)  # full names: PEFT adapts exactly these layers
    LoraConfig(r=p, lora_alpha=method.config.scaling * p, lora_dropout=0.0, target_modules=modules,
               base_model_name_or_path=method.encoder.path).save_pretrained(str(out))
    tensors = {}
    for name, layer in method.layers.items():
        B, A = layer.task_factors(idx)
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous().clone()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous().clone()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    if task_name in method.heads:
        head = method.heads.heads[task_name]
        save_file({k: v.cpu().contiguous() for k, v in head.state_dict().items()}, str(out / "head.safetensors"))
    (out / "classes.json").write_text(json.dumps({"task": task_name, "classes": method.task_classes[task_name]}, indent=2))
    return out
