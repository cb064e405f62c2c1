"""Checking a LoRA trained elsewhere before Share folds it without data (``ShareMethod.add_adapter``).

Module names are matched to the model's adapted layers up to a prefix, missing layers get zero
factors, shapes are checked and ``lora_B`` is rescaled from the adapter's ``lora_alpha / r`` to the
store's scaling, all before the model changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sharecl.methods.share import ShareMethod

__all__ = ["align_to_layers", "check_adapter_factors"]


def align_to_layers(factors: dict, layers: list[str]) -> dict:
    """Rename adapter modules to this model's layer names when they differ only by a prefix.

    An adapter trained on, say, ``BertForSequenceClassification`` names its layers
    ``bert.encoder.layer.0…`` where the bare encoder has ``encoder.layer.0…``. Each adapter
    module is matched to the one layer equal to it or that it ends with (``"." + layer``);
    a module that matches none or several, or two modules matching one layer, keep their
    names, so the caller's check reports them.
    """
    out, taken = {}, set()
    for key, value in factors.items():
        hits = [layer for layer in layers if key == layer or key.endswith("." + layer)]
        name = hits[0] if len(hits) == 1 and hits[0] not in taken else key
        taken.add(name)
        out[name] = value
    return out


def check_adapter_factors(method: ShareMethod, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                          scaling: float) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], int]:
    """One adapter's factors made ready to merge into ``method``'s layers.

    Args:
        method: the Share model the adapter is folded into.
        factors: ``{module name: (lora_B (d_out, r), lora_A (r, d_in))}``, any non-empty subset of
            the adapted layers, names possibly prefixed.
        scaling: the adapter's ``lora_alpha / r`` (``lora_alpha / √r`` for rsLoRA).

    Returns:
        ``({layer: (B · scaling / s, A)}`` for every adapted layer, in the base weight's dtype
        (zero rank-1 factors for the layers the adapter leaves out), the number left out``)``.

    Raises:
        ValueError: layers the model does not adapt, no layer in common, or shapes that do not fit.
    """
    layers = method.layers
    factors = align_to_layers(factors, list(layers))
    extra = sorted(set(factors) - set(layers))
    if extra or not factors:
        raise ValueError(f"adapter targets do not match this store's: unexpected {extra[:4]} (this store adapts "
                         f"{list(layers)[:4]}{' …' if len(layers) > 4 else ''})")
    missing = [n for n in layers if n not in factors]
    w = next(iter(layers.values())).base.weight
    factors = {**factors, **{n: (w.new_zeros(layers[n].out_features, 1), w.new_zeros(1, layers[n].in_features))
                             for n in missing}}
    ratio = scaling / method.config.scaling
    scaled = {}
    for name, (B, A) in factors.items():
        layer = layers[name]
        if B.shape[0] != layer.out_features or A.shape[1] != layer.in_features or B.shape[1] != A.shape[0]:
            raise ValueError(f"adapter layer {name}: lora_B {tuple(B.shape)} / lora_A {tuple(A.shape)} do not fit "
                             f"a ({layer.out_features}, {layer.in_features}) weight")
        w = layer.base.weight
        scaled[name] = (B.to(w) * ratio, A.to(w))
    return scaled, len(missing)
