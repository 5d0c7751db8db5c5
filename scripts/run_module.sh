#!/usr/bin/env bash
# Run a stages.* module of this repository, from any folder:
#   bash scripts/run_module.sh stages.hw3_2 ARGS...
# Python: $HW3_PYTHON when set; else the repository's .venv when it has one; else `python3` (the
# course's grading environment, where the repository has no .venv).
# The repository goes first on sys.path and the caller's folder is NOT on it (`python -m` would put
# the cwd first, where a folder named models/ or stages/ could shadow ours); relative paths in ARGS
# stay relative to the caller's folder. hw3_1.sh and hw3_2.sh exec this file, so it keeps to the
# course's rules for them: none of the commands they forbid, no fixed path (tests/test_handin.py).
set -euo pipefail
ROOT="$(dirname "$(dirname "${BASH_SOURCE[0]}")")"
if [ -n "${HW3_PYTHON:-}" ]; then
    PYTHON="${HW3_PYTHON}"
elif [ -x "${ROOT}/.venv/bin/python" ]; then
    PYTHON="${ROOT}/.venv/bin/python"
else
    PYTHON="python3"
fi
if [ -z "$(command -v "${PYTHON}")" ]; then   # exit 1 naming it, not bash's 127
    echo "error: ${PYTHON}: no such Python program (set HW3_PYTHON to one)" >&2
    exit 1
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
MODULE="$1"
shift
exec "${PYTHON}" -c 'import os, runpy, sys; sys.path[0] = os.path.abspath(sys.argv.pop(1)); runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)' "${ROOT}" "${MODULE}" "$@"
