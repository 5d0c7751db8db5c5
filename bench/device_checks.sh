#!/usr/bin/env bash
# The GPU measurements of issue 25 in one call of the device tool: bench/gpu.py, one process,
# each step under its own cap, everything within BUDGET seconds (default 360) and killed at
# LIMIT (default 380); results land in $OUT after every measurement (gpu_results.json,
# gpu_table.md, gpu_log.txt, hw3_2_log.txt), so a timeout loses nothing.
#
#   here, first:      bash bench/device_checks.sh --prepare
#   device tool:      command "bash bench/device_checks.sh", timeout_s 400, carry ["gpucarry"]
#   dry run here:     PYTHON=.venv/bin/python bash bench/device_checks.sh --device cpu --small
#
# The GPU machine has torch, timm, h5py, tokenizers, numpy, PIL and safetensors but not loralib,
# clip (clip-anytorch), ftfy or wcwidth, and it cannot download them: --prepare copies those
# packages out of .venv into gpucarry/ (git-ignored), which the device tool's `carry` brings. Arguments after the
# options are passed to bench/gpu.py (e.g. --steps train hw3_2, --variants gated_cross:lora).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf gpucarry && mkdir gpucarry
  # loralib: the LoRA layers; clip (with ftfy, wcwidth): captions are capped to CLIP's 77 tokens
  for pkg in loralib clip ftfy wcwidth; do cp -r "$site/$pkg" gpucarry/; done
  echo "gpucarry/ holds: $(ls gpucarry | tr '\n' ' ')"
  echo "now call the device tool with: command \"bash bench/device_checks.sh\", timeout_s 400, carry [\"gpucarry\"]"
  exit 0
fi

OUT=${OUT:-out/device_checks}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/gpucarry:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 \
  PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  date -u; } | tee "$OUT/gpu_log.txt"
timeout -k 5 "${LIMIT:-380}" "$PYTHON" -m bench.gpu --out "$OUT" --budget "${BUDGET:-360}" "$@" 2>&1 \
  | tee -a "$OUT/gpu_log.txt"
status=${PIPESTATUS[0]}
[ "$status" = 124 ] && echo "bench.gpu: killed at ${LIMIT:-380} s; $OUT/gpu_results.json holds what finished" \
  | tee -a "$OUT/gpu_log.txt"
exit "$status"
