#!/usr/bin/env bash
# CLIP zero-shot classification (DLCV HW3 problem 1).
#   bash hw3_1.sh IMG_DIR ID2LABEL_JSON OUT_CSV
# Writes OUT_CSV (header `filename,label`, one row per readable image; its folder is created).
# The CLIP and prompts come from params.yaml's `zeroshot` section (clip, predict_with).
# Exit status: 0 all images classified; 3 some files were unreadable (one stderr line each) but
# the CSV was written for the others; 1 fatal error (missing/empty folder, bad id2label.json,
# bad checkpoint), nothing written; 2 usage error.
set -euo pipefail

if [ "$#" -lt 3 ]; then
    echo "usage: bash hw3_1.sh IMG_DIR ID2LABEL_JSON OUT_CSV" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="python3"
if [ -x "${ROOT}/.venv/bin/python" ]; then
    PYTHON="${ROOT}/.venv/bin/python"
fi
export HF_HUB_OFFLINE=1

# Run stages.hw3_1 with the repo first on sys.path and the caller's folder NOT on it (`python -m`
# would put the cwd first, where a folder named models/ or stages/ could shadow ours); relative
# IMG_DIR / OUT_CSV paths stay relative to the caller's folder.
exec "${PYTHON}" -c 'import runpy, sys; sys.path[0] = sys.argv.pop(1); runpy.run_module("stages.hw3_1", run_name="__main__", alter_sys=True)' "${ROOT}" "$@"
