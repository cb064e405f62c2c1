"""Folding LoRA adapters without data: Share, lorashare 0.1.3 and vlora-dev 1.0.0 behind one interface.

Shared by ``bench_adapters.py`` (MiniLM encoder, scored through heads) and ``bench_lm_adapters.py``
(a causal LM, scored by generation). Each fold takes adapters one at a time (``add``) and gives back
each folded task's ΔW per adapted layer (``delta``: ``{layer: (out, in) float32}``, the LoRA scaling
included), so a benchmark can score a task by adding that ΔW to the base weights.

lorashare and vlora are not sharecl dependencies: ``pip install -c constraints.txt lorashare==0.1.3 vlora-dev==1.0.0``.
"""

from __future__ import annotations

import math

import torch


def gauge(B: torch.Tensor, A: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B R, R⁻¹ A)`` for a random R = Q diag(e^u), u ~ U(−1, 1): same ΔW, condition number ≤ e²."""
    Q = torch.linalg.qr(torch.randn(B.shape[1], B.shape[1], generator=g, dtype=torch.float64))[0]
    u = torch.rand(B.shape[1], generator=g, dtype=torch.float64) * 2 - 1
    Rm = Q * u.exp()
    return (B.double() @ Rm).float().contiguous(), torch.linalg.solve(Rm, A.double()).float().contiguous()


def regauge_file(path, g: torch.Generator) -> None:
    """Rewrite a PEFT ``adapter_model.safetensors`` in another gauge (:func:`gauge` per layer): the
    same ΔW with other factors, as another trainer might produce."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path))
    for key in [k for k in sd if k.endswith("lora_A.weight")]:
        kb = key.replace("lora_A", "lora_B")
        sd[kb], sd[key] = gauge(sd[kb], sd[key], g)
    save_file(sd, str(path), metadata={"format": "pt"})


def rel_error(approx: dict, exact: dict) -> float:
    """``‖ΔŴ − ΔW‖_F / ‖ΔW‖_F`` over all layers of ``exact``."""
    num = sum(float((approx[n] - exact[n]).double().pow(2).sum()) for n in exact)
    den = sum(float(exact[n].double().pow(2).sum()) for n in exact)
    return math.sqrt(num / den)


class ShareFold:
    """Share's data-free ``add_adapter`` (what ``sharecl add-adapter`` runs) on ``backbone``."""

    name = "Share"

    def __init__(self, backbone, r: int, alpha: float, k: int, p: int, **share_kw):
        from sharecl.methods.share import ShareMethod

        self.m = ShareMethod(backbone, seed=0, r=r, lora_alpha=alpha, k=k, p=p, **share_kw)

    def add(self, name, lora, state_dict):
        self.m.add_adapter(name, lora.factors, lora.scaling)

    def delta(self, name):
        i = self.m.index(name)
        return {n: layer.delta_weight(i) for n, layer in self.m.layers.items()}


class ShareBatchFold(ShareFold):
    """Share folding the adapters in batches of ``size`` (the paper's batch arrival): ``add`` buffers,
    and every ``size``-th call folds the buffer with ``ShareMethod.add_adapters`` (one truncation)."""

    def __init__(self, backbone, r: int, alpha: float, k: int, p: int, size: int, **share_kw):
        super().__init__(backbone, r, alpha, k, p, **share_kw)
        self.size, self.pending = size, []
        self.name = f"Share, batches of {size}"

    def add(self, name, lora, state_dict):
        self.pending.append((name, lora.factors, lora.scaling))
        if len(self.pending) == self.size:
            self.flush()

    def flush(self):
        if self.pending:
            self.m.add_adapters(self.pending)
            self.pending = []

    def delta(self, name):
        if any(name == n for n, _, _ in self.pending):
            raise RuntimeError(f"{name} is still waiting for its batch; score after a multiple of {self.size} adapters")
        return super().delta(name)


def lorashare_compress(sd: dict, k: int):
    """lorashare's recompression of all adapters' state dicts at once: ``(components, loadings per adapter)``."""
    from lorashare.compression import combine_adapter_weights, compute_adapter_loadings, compute_shared_components

    comps, _, _ = compute_shared_components(combine_adapter_weights(sd), num_components=k, device="cpu")
    return comps, {n: compute_adapter_loadings(comps, w) for n, w in sd.items()}


class LorashareFold:
    """lorashare 0.1.3: every add recompresses all adapters so far (``k`` components per layer and side)."""

    name = "lorashare 0.1.3"

    def __init__(self, k: int, scaling: float):
        self.k, self.scaling, self.sd, self.model = k, scaling, {}, None

    def add(self, name, lora, state_dict):
        self.sd[name] = state_dict
        self.model = lorashare_compress(self.sd, self.k)

    def delta(self, name):
        from lorashare.compression import parse_lora_key, reconstruct_adapter_weights

        comps, loadings = self.model
        rec = {parse_lora_key(key): w for key, w in reconstruct_adapter_weights(comps, loadings[name]).items()}
        return {layer: self.scaling * rec[(layer, "B")] @ rec[(layer, "A")] for (layer, side) in rec if side == "A"}


def vlora_weights(lora):
    from vlora import LoRAWeights

    names = sorted(lora.factors)
    return LoRAWeights(layer_names=names, lora_a={n: lora.factors[n][1] for n in names},
                       lora_b={n: lora.factors[n][0] for n in names}, rank=lora.rank)


class VloraFold:
    """vlora-dev 1.0.0: ``SharedSubspace.from_adapters`` on the first ``k + 1`` adapters, then
    ``absorb_incremental`` for each later one."""

    name = "vlora-dev 1.0.0"

    def __init__(self, k: int, scaling: float):
        self.k, self.scaling, self.pending, self.sub = k, scaling, [], None

    def add(self, name, lora, state_dict):
        from vlora import SharedSubspace

        w = vlora_weights(lora)
        if self.sub is not None:
            self.sub.absorb_incremental(w, name)
            return
        self.pending.append((name, w))  # from_adapters needs k + 1 adapters for k centred components
        if len(self.pending) == self.k + 1:
            self.sub = SharedSubspace.from_adapters([x for _, x in self.pending], task_ids=[n for n, _ in self.pending],
                                                    num_components=self.k)

    def delta(self, name):
        from vlora import SharedSubspace

        sub = self.sub or SharedSubspace.from_adapters([x for _, x in self.pending], task_ids=[n for n, _ in self.pending],
                                                       num_components=self.k)
        rec = sub.reconstruct(name)
        return {n: self.scaling * rec.lora_b[n] @ rec.lora_a[n] for n in rec.layer_names}


def share_numbers(k: int, p: int, shapes: list[tuple[int, int]], n: int) -> int:
    """Numbers Share stores for ``n`` tasks: a (d, k) basis per layer and side, and k·p coefficients per task, layer and side."""
    return k * sum(o + i for o, i in shapes) + n * len(shapes) * 2 * k * p


def stored_numbers(method: str, k: int, shapes: list[tuple[int, int]], n: int, r: int) -> int:
    """Numbers lorashare (bases + k·r loadings per side) or vlora (k + 1 flattened-factor rows,
    with the mean, + k loadings per side) stores for ``n`` rank-``r`` tasks, heads excluded."""
    d = sum(o + i for o, i in shapes)
    return d * k + n * len(shapes) * 2 * k * r if method == "lorashare" else (k + 1) * r * d + n * len(shapes) * 2 * k


def equal_bytes(share_total: int, shapes: list[tuple[int, int]], n: int, r: int) -> tuple[int, int]:
    """Largest k for lorashare and vlora whose stored numbers at ``n`` tasks fit in ``share_total`` (at least 1)."""
    ks = [max([1] + [k for k in range(1, 4096) if stored_numbers(m, k, shapes, n, r) <= share_total]) for m in ("lorashare", "vlora")]
    return ks[0], ks[1]


def plot(curves: dict, bare: float, path, bare_label: str) -> None:
    """Score retained and ΔW error against the number of adapters folded, one line per method
    (``curves[method]``: points with ``n``, ``retention``, ``dW_rel_error``); ``bare``: the
    retention without any adapter, a dotted line labelled ``bare_label``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, pts in curves.items():
        pts = [p for p in pts if p.get("retention") is not None]
        a1.plot([p["n"] for p in pts], [p["retention"] for p in pts], marker="o", label=name)
        a2.plot([p["n"] for p in pts], [p["dW_rel_error"] for p in pts], marker="o", label=name)
    a1.axhline(bare, color="grey", ls=":", label=bare_label)
    a1.axhline(0.97, color="black", ls="--", lw=0.8, label="0.97 (paper)")
    a1.set(xlabel="adapters folded", ylabel="score retained (folded ÷ original)", title="Task score retained")
    a2.set(xlabel="adapters folded", ylabel="‖ΔŴ − ΔW‖ / ‖ΔW‖ (mean over tasks)", title="ΔW error, equal stored bytes")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
