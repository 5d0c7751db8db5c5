#!/usr/bin/env bash
# CLIP zero-shot classification (DLCV HW3 problem 1).
#   bash hw3_1.sh IMG_DIR ID2LABEL_JSON OUT_CSV
# Writes OUT_CSV (header `filename,label`, one row per readable image; its folder is created).
# The CLIP and prompts come from params.yaml's `zeroshot` section (clip, predict_with); a CLIP file
# there comes with hw3_download.sh. Python: $HW3_PYTHON, else the repository's .venv, else python3
# (scripts/run_module.sh).
# Exit status: 0 all images classified; 3 some files were unreadable (one stderr line each) but
# the CSV was written for the others; 1 fatal error (missing/empty folder, bad id2label.json,
# bad checkpoint), nothing written; 2 usage error.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: bash hw3_1.sh IMG_DIR ID2LABEL_JSON OUT_CSV" >&2
    exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run_module.sh" stages.hw3_1 "$@"
