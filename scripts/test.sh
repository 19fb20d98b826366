#!/usr/bin/env bash
# README command (b) and CI: install, then run the whole test suite.
# pytest exit codes: 0 all passed; 1 failures; 2 interrupted; 3 internal error; 4 usage error;
# 5 no tests collected. Every non-zero code fails this script (5 included: a suite that collects
# nothing has not tested anything).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg
# where set-up can install Chromium (Debian, CI), the offline view-rendering test must run
if command -v apt-get >/dev/null; then export KN_LENS_REQUIRE_CHROMIUM=1; fi
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
case $rc in
  0) echo "kn-lens tests: passed" ;;
  5) echo "kn-lens tests: pytest collected no tests (exit 5) - failing" >&2 ;;
  *) echo "kn-lens tests: pytest exited with $rc" >&2 ;;
esac
exit $rc
