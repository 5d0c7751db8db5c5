#!/usr/bin/env bash
# The GPU measurements issue 9 still lacks, in one call of the device tool (600 s at most), most
# important first; each step has its own time limit, so a slow one cannot eat the others.
#
#   here, first:      bash bench/device_checks.sh --prepare
#   on the device:    bash bench/device_checks.sh          # results in $OUT/device_checks.tgz
#
# The GPU machine has torch, timm, h5py and tokenizers but not loralib or clip (and it cannot
# download them): --prepare copies those pure-Python packages out of .venv into gpucarry/, which
# the device tool copies with the working tree because it is neither tracked nor ignored. Do not
# commit gpucarry/.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  set -e
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  rm -rf gpucarry && mkdir gpucarry
  # clip (with ftfy, wcwidth) is imported where captions are capped to CLIP's 77 tokens
  for pkg in loralib clip ftfy wcwidth; do cp -r "$site/$pkg" gpucarry/; done
  echo "gpucarry/ holds: $(ls gpucarry | tr '\n' ' ')"
  exit 0
fi

# The device tool brings back at most 8 files from $OUT: the steps write into $RESULTS, and after
# each step $OUT/device_checks.tgz is made anew from it, so what finished comes back even if the
# call's own time limit stops the script.
OUT=${OUT:-out/device_checks}
RESULTS=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH="$PWD/gpucarry:$PWD" HF_HUB_OFFLINE=1 TQDM_DISABLE=1 PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"; date -u; } | tee "$RESULTS/device.txt"

step() {   # step NAME SECONDS COMMAND...: output to NAME.txt (and NAME/ where it passes --out)
  local name=$1 limit=$2
  shift 2
  echo "== $name ($limit s at most): $*"
  timeout "$limit" "$@" >"$RESULTS/$name.txt" 2>&1
  echo "   exit status $?; last line: $(tail -n 1 "$RESULTS/$name.txt")"
  tar czf "$OUT/device_checks.tgz.part" -C "$RESULTS" . && mv "$OUT/device_checks.tgz.part" "$OUT/device_checks.tgz"
}

VARIANTS="gated_cross:adapter gated_cross:lora gated_cross:prefix gated_cross:prompt gated_cross:adaption_prompt visual_prefix:lora"
# 1. Does train.compile (CUDA graphs) bring adapter's epoch (68 s) under 60 s, with the captions
#    in random order and with each image's captions batched together (train.group_by_image)?
step compile 250 python3 -m bench.compile --device cuda --threads 8 --sizes real --batch-size 64 \
  --steps 30 --variants gated_cross:adapter --batches random "by image"
# 2. Every variant as train() runs it now (low-rank LoRA, is_causal, training_steps, trainable
#    Linear weights stored bf16 with fp32 masters) and, side by side, with its trainable Linear
#    weights cast by autocast (as measured on 2026-11-23), and with each image's captions batched
#    together (train.group_by_image); adapter profiled.
step train 180 python3 -m bench.gpu --out "$RESULTS/train" --images 256 --skip encoder extract beam e2e \
  --train-settings "frozen stored" "as is" --batches random "by image" --variants $VARIANTS
# 3. Adapter at batch 128: half the launches per caption.
step batch128 60 python3 -m bench.gpu --out "$RESULTS/batch128" --images 256 \
  --skip encoder extract beam e2e profile --variants gated_cross:adapter --train-batch 128
# 4. LoRA's low-rank forward vs loralib's on the GPU.
step lora 70 python3 -m bench.lora --device cuda --threads 8 --sizes real --real-batch 64 --real-images 64
