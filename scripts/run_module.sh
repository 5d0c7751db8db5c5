#!/usr/bin/env bash
# Run a stages.* module of this repository with the repository's Python, from any folder:
#   scripts/run_module.sh stages.hw3_2 ARGS...
# The repository goes first on sys.path and the caller's folder is NOT on it (`python -m` would put
# the cwd first, where a folder named models/ or stages/ could shadow ours); relative paths in ARGS
# stay relative to the caller's folder.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="python3"
if [ -x "${ROOT}/.venv/bin/python" ]; then
    PYTHON="${ROOT}/.venv/bin/python"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
MODULE="$1"
shift
exec "${PYTHON}" -c 'import runpy, sys; sys.path[0] = sys.argv.pop(1); runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)' "${ROOT}" "${MODULE}" "$@"
