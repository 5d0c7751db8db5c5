#!/usr/bin/env bash
# Run the hand-in as the course's TAs would, in a venv like their grading environment, on the demo
# world; then compare with what the pipeline itself predicted (`make grading-check`).
#   bash scripts/grading_check.sh
# Settings (environment variables; `make grading-check VAR=...` passes them):
#   PIPELINE        the folder whose pipeline outputs are checked: release/, predictions/p1.csv,
#                   predictions/<selected variant>/val.json, params.yaml and the world's data
#                   (default: this repository)
#   GRADING_ENV     the grading venv (default .grading_env; built by scripts/grading_env.sh when
#                   missing, ~1-3 minutes from the package index)
#   GRADING_SOURCE  clone (default): `git clone` of the repository's HEAD, as the TAs get it;
#                   worktree: the working tree's tracked and untracked-but-not-ignored files
#                   (uncommitted changes included, ignored ones such as .venv/ and release/ not)
#   PROJECT_PYTHON  the project's Python, which packs the release and scores (default .venv)
#   MODERN_TOO=1    also run hw3_2.sh with PROJECT_PYTHON (torch 2.x) on the same release and
#                   compare it with the grading environment's captions
#   KEEP=1          keep the scratch folder (printed at the end)
# Steps: a fresh copy of the repository (no .venv, no release/); `python -m stages.handin` packs
# PIPELINE's release into a scratch folder and points the copy's hw3_download.sh at it; that folder
# is served by `python3 -m http.server --bind 127.0.0.1`; then, in the copy, with the grading
# venv's python3 first on PATH and nothing of ours in the environment: bash hw3_download.sh,
# bash hw3_1.sh and bash hw3_2.sh on the world's p1 val / p2 val images (absolute paths), each
# timed; then scripts/grading_compare.py (CSV identical, >= 98% of captions equal, CIDEr-D within
# 0.01) and the grading venv's `pip freeze`. Exit status 0 when all of it passes.
set -euo pipefail
T0=$(date +%s.%N)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PIPELINE="$(cd "${PIPELINE:-${REPO}}" && pwd)"
GRADING_ENV="${GRADING_ENV:-${REPO}/.grading_env}"
GRADING_SOURCE="${GRADING_SOURCE:-clone}"
PROJECT_PYTHON="${PROJECT_PYTHON:-${REPO}/.venv/bin/python}"

say() { echo "grading-check: $*"; }
fail() { echo "grading-check: error: $*" >&2; exit 1; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(date +%s.%N)"; }

[ -x "${PROJECT_PYTHON}" ] || fail "${PROJECT_PYTHON}: no project Python (run \`make env\`, or set PROJECT_PYTHON)"
case "${GRADING_SOURCE}" in clone|worktree) ;; *) fail "GRADING_SOURCE must be clone or worktree, got ${GRADING_SOURCE}";; esac
if [ ! -x "${GRADING_ENV}/bin/python3" ]; then
    say "building the grading environment in ${GRADING_ENV}"
    bash "${REPO}/scripts/grading_env.sh" "${GRADING_ENV}"
fi
GRADING_ENV="$(cd "${GRADING_ENV}" && pwd)"

# What the pipeline made, and where its world's data are (absolute paths).
read -r VARIANT DATA_ROOT DECODER < <("${PROJECT_PYTHON}" - "${PIPELINE}" <<'EOF'
import json, sys, yaml
from pathlib import Path
pipeline = Path(sys.argv[1])
world = yaml.safe_load((pipeline / "params.yaml").read_text())["world"]
variant = json.loads((pipeline / "release/selected.json").read_text())["variant"]
print(variant, *(str(pipeline / world[k]) for k in ("data_root", "decoder")))
EOF
) || fail "${PIPELINE}: no release/selected.json or params.yaml world section (run \`dvc repro\` there)"
P1_IMAGES="${DATA_ROOT}/p1_data/val"
P2_IMAGES="${DATA_ROOT}/p2_data/images/val"
for f in "${PIPELINE}/predictions/p1.csv" "${PIPELINE}/predictions/${VARIANT}/val.json" \
         "${P1_IMAGES}" "${DATA_ROOT}/p1_data/id2label.json" "${P2_IMAGES}" \
         "${DATA_ROOT}/p2_data/val.json" "${DECODER}"; do
    [ -e "${f}" ] || fail "${f}: missing (run \`dvc repro\` in ${PIPELINE})"
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/grading-check.XXXXXX")"
SERVER_PID=""
cleanup() {
    if [ -n "${SERVER_PID}" ]; then kill "${SERVER_PID}" 2>/dev/null || true; fi
    if [ "${KEEP:-0}" = 1 ]; then say "kept ${WORK}"; else rm -rf "${WORK}"; fi
}
trap cleanup EXIT
CLONE="${WORK}/repo"
if [ "${GRADING_SOURCE}" = clone ]; then
    git clone --quiet --no-local "${REPO}" "${CLONE}"
    say "clone of ${REPO} at $(git -C "${CLONE}" rev-parse --short HEAD)"
else
    mkdir -p "${CLONE}"
    SKIP=(--exclude=/handin/ --exclude=/release.tar.gz)   # what hw3_download.sh / make handin write
    case "${GRADING_ENV}/" in "${REPO}"/*) SKIP+=("--exclude=/${GRADING_ENV#"${REPO}"/}/");; esac
    (cd "${REPO}" && git ls-files -z --cached --others --exclude-standard "${SKIP[@]}" \
        | while IFS= read -r -d '' f; do [ -e "${f}" ] && printf '%s\0' "${f}"; done \
        | tar --null -T - -cf -) | tar -xf - -C "${CLONE}"
    say "working tree of ${REPO} (git-ignored files left out)"
fi
for p in .venv release data; do
    [ ! -e "${CLONE}/${p}" ] || fail "${CLONE}/${p} exists in a fresh copy: is it committed?"
done

# The release, packed from PIPELINE and served on 127.0.0.1.
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
(cd "${CLONE}" && "${PROJECT_PYTHON}" -m stages.handin --pipeline "${PIPELINE}" \
    --out "${WORK}/serve" --download-script "${CLONE}/hw3_download.sh" \
    --url "http://127.0.0.1:${PORT}/release.tar.gz") | sed 's/^/  handin: /'
"${GRADING_ENV}/bin/python3" -m http.server "${PORT}" --bind 127.0.0.1 --directory "${WORK}/serve" \
    >"${WORK}/http.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 50); do
    wget -q --spider "http://127.0.0.1:${PORT}/release.tar.gz" && break
    sleep 0.2
done

# The TAs' shell: the grading venv's python3 first on PATH; no .venv, VIRTUAL_ENV, PYTHONPATH,
# HW3_PYTHON or HF_HUB_OFFLINE of ours.
CLEAN_PATH="$(printf '%s' "${PATH}" | tr ':' '\n' | grep -v -e '/\.venv/bin$' -e "^${GRADING_ENV}/bin$" | paste -sd: -)"
ta() {
    (cd "${CLONE}" && env -u VIRTUAL_ENV -u PYTHONPATH -u HW3_PYTHON -u HF_HUB_OFFLINE \
        PATH="${GRADING_ENV}/bin:${CLEAN_PATH}" "$@")
}
say "python3 there: $(ta python3 -c 'import sys, torch; print(sys.executable, sys.version.split()[0], "torch", torch.__version__)')"
OUT="${WORK}/out"
mkdir -p "${OUT}"
STATUS=0
run_timed() {   # name, then the command
    local name="$1" t rc
    shift
    t=$(date +%s.%N)
    set +e
    ta "$@" 2>&1 | sed "s/^/  ${name}: /"
    rc=${PIPESTATUS[0]}
    set -e
    say "${name}: exit status ${rc}, wall time $(elapsed "${t}") s"
    [ "${rc}" = 0 ] || STATUS=1
    return 0
}
run_timed hw3_download.sh bash hw3_download.sh
run_timed hw3_1.sh bash hw3_1.sh "${P1_IMAGES}" "${DATA_ROOT}/p1_data/id2label.json" "${OUT}/p1.csv"
run_timed hw3_2.sh bash hw3_2.sh "${P2_IMAGES}" "${OUT}/p2.json" "${DECODER}"
[ "${STATUS}" = 0 ] || fail "a script failed (above)"

"${PROJECT_PYTHON}" "${REPO}/scripts/grading_compare.py" --csv "${OUT}/p1.csv" \
    --expected-csv "${PIPELINE}/predictions/p1.csv" --json "${OUT}/p2.json" \
    --expected-json "${PIPELINE}/predictions/${VARIANT}/val.json" \
    --references "${DATA_ROOT}/p2_data/val.json" || STATUS=1

if [ "${MODERN_TOO:-0}" = 1 ]; then
    say "the same release on the project's stack ($("${PROJECT_PYTHON}" -c 'import torch; print("torch", torch.__version__)'))"
    t=$(date +%s.%N)
    (cd "${CLONE}" && HW3_PYTHON="${PROJECT_PYTHON}" bash hw3_2.sh "${P2_IMAGES}" "${OUT}/p2_modern.json" "${DECODER}") 2>&1 | sed 's/^/  hw3_2.sh (modern): /'
    say "hw3_2.sh (modern): wall time $(elapsed "${t}") s"
    "${PROJECT_PYTHON}" - "${OUT}/p2_modern.json" "${OUT}/p2.json" "${PIPELINE}/predictions/${VARIANT}/val.json" <<'EOF'
import json, sys
modern, grading, pipeline = (json.load(open(p)) for p in sys.argv[1:])
for name, other in (("grading env", grading), ("pipeline", pipeline)):
    differ = sorted(k for k in pipeline if modern.get(k) != other.get(k))
    print(f"  modern-stack hw3_2.sh vs {name}: {len(differ)} of {len(pipeline)} captions differ"
          + (f" ({', '.join(differ[:10])})" if differ else ""))
EOF
fi

say "pip freeze of ${GRADING_ENV}:"
"${GRADING_ENV}/bin/python3" -m pip freeze --all 2>/dev/null | sed 's/^/  /'
say "total $(elapsed "${T0}") s"
exit "${STATUS}"
