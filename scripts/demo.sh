#!/usr/bin/env bash
# README command (a): install, prepare the default model and run the main job on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
.venv/bin/kn-lens models prepare smollm2-135m
.venv/bin/kn-lens demo "$@"
