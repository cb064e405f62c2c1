"""Find the linear layers to adapt by name, with PEFT's matching rules, and wrap them.

``target_modules`` follows ``peft.LoraConfig``: a string is a regular expression that must
match the *whole* module name (``re.fullmatch``); a list matches a module whose name equals
an entry or ends with ``"." + entry``; the string ``"all-linear"`` (any case) selects every
``nn.Linear`` but the model's output embeddings (a causal LM's ``lm_head``), as PEFT's
shorthand does (:func:`all_linear_targets`). Defaults per architecture family come from
:data:`DEFAULT_TARGETS` (transformers 5.x names).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from torch import nn

__all__ = ["DEFAULT_TARGETS", "ALL_LINEAR", "default_targets", "match_target", "find_targets", "all_linear_targets",
           "wrap_targets", "set_submodule"]

M = TypeVar("M", bound=nn.Module)

#: PEFT's shorthand for every linear layer but the output layer (``LoraConfig(target_modules="all-linear")``).
ALL_LINEAR = "all-linear"

#: Default LoRA targets (query and value projections) per ``config.model_type``.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "mpnet": ["q", "v"],
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "smollm3": ["q_proj", "v_proj"],
    "dinov2": ["q_proj", "v_proj"],
    "vit": ["q_proj", "v_proj"],
}


def is_all_linear(target_modules) -> bool:
    """Whether ``target_modules`` is PEFT's ``"all-linear"`` shorthand (any case)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def all_linear_targets(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` of ``model`` except its output embeddings, in model order:
    what PEFT's ``target_modules="all-linear"`` selects on a transformers model (the output layer,
    ``get_output_embeddings()``, e.g. a causal LM's ``lm_head``, is left out; a bare encoder has none).
    Layers inside an adapter wrapper already in the model (a ``.base`` of sharecl's layers) are
    not listed: they are adapted already."""
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    wrapped = {f"{n}.base" for n, m in model.named_modules() if isinstance(getattr(m, "base", None), nn.Linear) and n}
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not out_emb and n not in wrapped]


def match_target(name: str, target_modules: str | Sequence[str]) -> bool:
    """Whether module ``name`` is selected by ``target_modules`` under PEFT's rules (not for
    ``"all-linear"``, which depends on the model: :func:`find_targets` resolves it)."""
    if is_all_linear(target_modules):
        raise ValueError("'all-linear' depends on the model; resolve it with find_targets(model, 'all-linear')")
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def default_targets(model: nn.Module) -> list[str]:
    """Default targets for a transformers model, from its ``config.model_type``.

    Falls back to whichever of the known query/value names the model's linear layers use.

    Raises:
        ValueError: if no default is known and no known naming is found; pass
            ``target_modules`` explicitly then.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for pair in (["q_proj", "v_proj"], ["query", "value"], ["q", "v"], ["q_lin", "v_lin"]):
        if set(pair) <= names:
            return pair
    raise ValueError(
        f"no default LoRA targets for model_type={model_type!r}; pass target_modules "
        f"(for example ['q_proj', 'v_proj']); linear layer names found: {sorted(names)[:20]}"
    )


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` selected by ``target_modules``, in order.

    ``"all-linear"`` resolves to :func:`all_linear_targets`.

    Raises:
        ValueError: if nothing matches (the message lists some linear layer names).
    """
    if is_all_linear(target_modules):
        found = all_linear_targets(model)
        if not found:
            raise ValueError("target_modules='all-linear' found no nn.Linear in this model")
        return found
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and match_target(n, target_modules)]
    if not found and any(type(m).__name__ == "Conv1D" and match_target(n, target_modules) for n, m in model.named_modules()):
        raise ValueError(f"target_modules={target_modules!r} selects GPT-2-style Conv1D layers, which sharecl's adapters "
                         f"do not wrap yet (they wrap nn.Linear); use a Llama, Qwen2, Mistral or Gemma model")
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear; some linear layers: {linear[:8]}")
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` by ``module``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def wrap_targets(model: nn.Module, target_modules: str | Sequence[str], factory: Callable[[nn.Linear], M]) -> dict[str, M]:
    """Replace every selected linear layer by ``factory(layer)``; returns ``{name: wrapper}``."""
    wrapped: dict[str, M] = {}
    for name in find_targets(model, target_modules):
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)  # find_targets returns nn.Linear modules only
        new = factory(lin)
        set_submodule(model, name, new)
        wrapped[name] = new
    return wrapped
