#!/usr/bin/env bash
# Rewrite constraints.txt from what .venv holds now (after `bash scripts/setup.sh` and a green test run).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${SHARECL_VENV:-.venv}"
{
  echo "# What scripts/setup.sh installs, pinned: the versions the tests and the README's current numbers were made"
  echo "# with (Python 3.11, CPU). torch==2.13.0 also keeps pip from replacing the CPU wheel with a CUDA build."
  echo "# Regenerate after an upgrade that the tests pass with: bash scripts/lock.sh"
  echo "torch==2.13.0"
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check | grep -v -i "^torch==" | sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
