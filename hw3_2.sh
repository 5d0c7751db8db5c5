#!/usr/bin/env bash
# Image captioning (DLCV HW3 problem 2).
#   bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN
# Writes OUT_JSON ({file name without extension: caption} for every readable image; its folder is
# created) with the variant that `dvc repro` selected (release/, which hw3_download.sh fetches) and
# the frozen GPT-2 DECODER_BIN. Python: $HW3_PYTHON, else the repository's .venv, else python3
# (scripts/run_module.sh).
# Exit status: 0 all images captioned; 3 some files were unreadable (one stderr line each) but the
# JSON was written for the others; 1 fatal error, nothing written; 2 usage error.
set -euo pipefail
if [ "$#" -lt 3 ]; then
    echo "usage: bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN" >&2
    exit 2
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/scripts/run_module.sh" stages.hw3_2 "$@"
