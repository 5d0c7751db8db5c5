#!/usr/bin/env bash
# Fetch what hw3_1.sh and hw3_2.sh need in the real world, so that both then run offline:
# 1. the release/ folder that `dvc repro select` made on the training machine (the selected
#    trainable checkpoint, its vocabulary and settings), from the DVC remote;
# 2. the pretrained weights they load: the released captioner's image encoder (timm or CLIP) and
#    the zero-shot CLIP of params.yaml, into timm's and CLIP's caches (stages/hw3_prefetch.py).
# Whoever trained sets the remote up once, then commits it with the real world's lock file:
#   dvc remote add -d storage /mnt/share/hw3-dvc     (a shared folder; for s3://... first
#                                                     `pip install dvc-s3` into .venv)
#   dvc push select
#   git add .dvc/config dvc.lock params.yaml && git commit -m "real-world release" && git push
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
PATH="$(pwd)/.venv/bin:${PATH}"
if ! command -v dvc >/dev/null; then
    echo "hw3_download.sh: dvc not found: run \`make env\` first (it creates .venv)" >&2
    exit 1
fi
if ! dvc remote list | grep -q .; then
    echo "hw3_download.sh: no DVC remote configured; see the comment at the top of this file" >&2
    exit 1
fi
dvc pull select
HF_HUB_OFFLINE=0 scripts/run_module.sh stages.hw3_prefetch
