#!/usr/bin/env bash
# Fetch what hw3_1.sh and hw3_2.sh need (DLCV HW3: the graders run this first, once), so that both
# then run offline:
# 1. the release archive that `make handin` packed (release/: the selected trainable checkpoint,
#    its vocabulary and settings; plus any local model file the two scripts load, e.g. the demo
#    world's CLIP), downloaded with `wget -O` from RELEASE_URL, checked against RELEASE_SHA256
#    and unpacked here, at the top of the repository, with `tar zxf`;
# 2. the pretrained weights they load by name: the released captioner's image encoder (timm or
#    CLIP) and the zero-shot CLIP of params.yaml, into timm's and CLIP's caches
#    (stages/hw3_prefetch.py; local files are only checked to load).
#
# The one place to set: the two lines below. Do not edit them by hand:
#   make handin URL=https://host/path/release.tar.gz     (python -m stages.handin --url URL)
# packs handin/release.tar.gz and writes both lines; upload that file to URL (a direct download
# link: wget must receive the file itself, not a web page), then commit this script.
# On our own machines `make pull-release` takes the DVC remote route instead (`dvc pull select demo_clip`).
RELEASE_URL=''
RELEASE_SHA256=''

set -euo pipefail
ROOT="$(dirname "${BASH_SOURCE[0]}")"
if [ -z "${RELEASE_URL}" ] || [ -z "${RELEASE_SHA256}" ]; then
    echo "hw3_download.sh: RELEASE_URL is not set: run \`make handin URL=...\` (see the comment" \
         "at the top of this file), or \`make pull-release\` to take the DVC remote route" >&2
    exit 1
fi
ARCHIVE="${ROOT}/release.tar.gz"
if ! wget --no-verbose -O "${ARCHIVE}" "${RELEASE_URL}"; then
    echo "hw3_download.sh: could not download ${RELEASE_URL}" >&2
    exit 1
fi
if ! echo "${RELEASE_SHA256}  ${ARCHIVE}" | sha256sum --check --status -; then
    echo "hw3_download.sh: ${ARCHIVE} from ${RELEASE_URL} is not the release \`make handin\`" \
         "packed (sha256 $(sha256sum < "${ARCHIVE}" | head -c 64), expected ${RELEASE_SHA256})" >&2
    exit 1
fi
echo "hw3_download.sh: ${ARCHIVE}: sha256 OK"
tar zxf "${ARCHIVE}" -C "${ROOT}"
HF_HUB_OFFLINE=0 bash "${ROOT}/scripts/run_module.sh" stages.hw3_prefetch
