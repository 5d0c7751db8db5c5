#!/usr/bin/env bash
# Wall time of the demo pipeline in a fresh clone: `dvc repro` from scratch, a second (no-op)
# `dvc repro`, and `dvc exp run -S peft.lora.rank=16`; prints which stages each one ran.
#
#   bash bench/pipeline.sh                 # clones the current repo's HEAD into /tmp/bench_pipeline
#   bash bench/pipeline.sh REPO WORKDIR
#
# Only committed files are cloned: commit first. The clone uses REPO's .venv through a symlink
# and starts with an empty DVC cache, so the first repro really runs every stage.
set -euo pipefail

REPO=$(cd "${1:-$(git rev-parse --show-toplevel)}" && pwd)
DIR=${2:-/tmp/bench_pipeline}
[ -x "$REPO/.venv/bin/dvc" ] || { echo "$REPO/.venv/bin/dvc not found: run 'make env' in $REPO" >&2; exit 1; }

rm -rf "$DIR"
git clone -q "$REPO" "$DIR"
cd "$DIR"
ln -s "$REPO/.venv" .venv
export PATH="$DIR/.venv/bin:$PATH" DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1
dvc config --local core.analytics false >/dev/null 2>&1 || true
echo "fresh clone of $REPO ($(git -C "$REPO" rev-parse --short HEAD)) in $DIR; $(nproc) cores; $(date -u '+%Y-%m-%d %H:%M UTC')"

declare -a ROWS
step() {   # step LABEL COMMAND...: run it, log to $DIR/bench_LABEL.log, record seconds + stages run
    local label=$1; shift
    local log="$DIR/bench_${label// /_}.log"
    local start end
    start=$(date +%s.%N)
    if ! "$@" >"$log" 2>&1; then
        echo "FAILED: $* (log: $log)" >&2
        tail -20 "$log" >&2
        exit 1
    fi
    end=$(date +%s.%N)
    local ran
    # a no-op repro runs no stage: grep finds nothing, which must not stop the script (set -e)
    ran=$({ grep -oE "Running stage '[^']+'" "$log" || true; } \
          | sed -E "s/Running stage '([^']+)'/\1/" | paste -sd ' ' -)
    local secs
    secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    ROWS+=("$(printf '%-28s %9s s   %s' "$label" "$secs" "${ran:-(none)}")")
    echo "$label: $secs s; stages run: ${ran:-(none)}"
}

step "dvc repro (from scratch)" dvc repro
step "dvc repro (no-op)" dvc repro
step "dvc exp run -S peft.lora.rank=16" dvc exp run -S peft.lora.rank=16

echo
printf '%-28s %11s   %s\n' "command" "wall time" "stages run"
for r in "${ROWS[@]}"; do echo "$r"; done
