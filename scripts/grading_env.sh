#!/usr/bin/env bash
# Build a venv like the course's grading environment (Python 3.8, torch 1.12.1, timm 0.9.10, ...;
# the pins are in scripts/grading_env.txt), to check that hw3_1.sh and hw3_2.sh run there.
#   bash scripts/grading_env.sh VENV_DIR
# Python 3.8 comes from pyenv (the newest `pyenv root`/versions/3.8.*) or else `python3.8` on PATH.
# Then run a hand-in script with that venv's python3 first on PATH, e.g.
#   PATH="VENV_DIR/bin:$PATH" bash hw3_2.sh IMG_DIR OUT_JSON DECODER_BIN
set -euo pipefail
if [ "$#" -ne 1 ]; then
    echo "usage: bash scripts/grading_env.sh VENV_DIR" >&2
    exit 2
fi
VENV="$1"
REQUIREMENTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/grading_env.txt"

find_python38() {
    local root="${PYENV_ROOT:-${HOME}/.pyenv}" found=""
    if command -v pyenv >/dev/null 2>&1; then
        root="$(pyenv root)"
    fi
    found="$(printf '%s\n' "${root}"/versions/3.8.*/bin/python3.8 | sort -V | tail -n 1)"
    if [ -x "${found}" ]; then
        echo "${found}"
    else
        command -v python3.8 || true
    fi
}

PYTHON38="$(find_python38)"
if [ -z "${PYTHON38}" ] || ! "${PYTHON38}" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 8))'; then
    echo "grading_env.sh: no Python 3.8 found (install one, e.g. \`pyenv install 3.8.18\`, or put python3.8 on PATH)" >&2
    exit 1
fi
if [ -e "${VENV}" ]; then
    echo "grading_env.sh: ${VENV} already exists; remove it or name a new folder" >&2
    exit 1
fi

echo "grading_env.sh: ${PYTHON38} ($("${PYTHON38}" -V 2>&1)) -> ${VENV}"
"${PYTHON38}" -m venv "${VENV}"
"${VENV}/bin/python" -m pip install --no-input -r "${REQUIREMENTS}"
"${VENV}/bin/python" -m pip check
"${VENV}/bin/python" -W ignore -c '
import platform
import clip, cv2, gdown, imageio, loralib, matplotlib, numpy, pandas, PIL, safetensors, scipy
import skimage, timm, torch, torchvision, tqdm, yaml
print(f"grading_env.sh: ready: Python {platform.python_version()}, torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}, timm {timm.__version__}, numpy {numpy.__version__}")'
