#!/usr/bin/env bash
# Fetch what hw3_2.sh needs in the real world: the release/ folder that `dvc repro select` made
# on the training machine (the selected trainable checkpoint, its vocabulary and settings).
# It comes from the DVC remote configured once by whoever trained, e.g.
#   dvc remote add -d storage s3://bucket/hw3     (or a shared folder: /mnt/share/hw3-dvc)
#   dvc push select
# The frozen image encoder's weights come from timm's or CLIP's own cache (download them once on a
# machine with a network: python -c "import timm; timm.create_model('NAME', pretrained=True)").
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
