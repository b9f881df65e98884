#!/usr/bin/env bash
# bench/serve end to end: builds a supernet from a preset (random weights), starts amoeba-server on a
# loopback port, runs the load generator, reports the server's resident memory with every grid
# shape in use next to the supernet's weight bytes, and stops the server.
#   bench/serve.sh [preset=tiny|100m] [extra amoeba-server flags...]
# TUNED=1 adds SMoL adapters (a one-step tune): never-seen shapes then run with the adapters
# unmerged while a merged copy is built in the background (pass --merge-after 1 to build it on the
# first request).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-100m}
shift || true
B=build
WORK=$(mktemp -d)
trap 'kill -TERM ${PID:-0} 2>/dev/null || true; rm -rf "$WORK"' EXIT
$B/admin/amoeba-admin init --out "$WORK/m" --preset "$PRESET" --seed 1 2>/dev/null
python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 400))" > "$WORK/calib.txt"
$B/admin/amoeba-admin calibrate --model "$WORK/m" --data "$WORK/calib.txt" --out "$WORK/s" \
  --windows 4 --window-len 64 --dp-windows 2 > /dev/null 2>&1
if [ "${TUNED:-0}" = 1 ]; then
  $B/admin/amoeba-admin tune --supernet "$WORK/s" --data "$WORK/calib.txt" --steps 1 --batch 1 \
    --seq-len 32 --subnets 2 > /dev/null 2>&1
fi
$B/server/amoeba-server --supernet "$WORK/s" --host 127.0.0.1 --port 0 --metrics-port -1 \
  --port-file "$WORK/ports" --max-context 256 "$@" > "$WORK/server.log" 2>&1 &
PID=$!
for _ in $(seq 1 600); do [ -s "$WORK/ports" ] && break; sleep 0.2; done
PORT=$(cut -d' ' -f1 "$WORK/ports")
$B/bench/amoeba-bench-serve --target "127.0.0.1:$PORT"
if [ "${TUNED:-0}" = 1 ]; then
  echo "Tuned supernet (SMoL adapters), server flags: $*" | tee -a bench/results/serve.md
fi
RSS=$(awk '/VmRSS/ {print $2 * 1024}' /proc/$PID/status)
# Where it goes: the mapped weights file, anonymous memory (heap, KV, buffers), shared libraries.
awk '/^[0-9a-f]+-[0-9a-f]+ / {name=$6} /^Rss/ {if (name ~ /safetensors/) w+=$2; else if (name ~ /\.so/) l+=$2; else a+=$2}
     END {printf "RSS breakdown: weights file %.0f MB, anonymous %.0f MB, shared libraries %.0f MB\n", w/1024, a/1024, l/1024}' \
  /proc/$PID/smaps | tee -a bench/results/serve.md
# The supernet's weight bytes: the model, plus the SMoL adapters when tuned.
WEIGHTS=$( (cat "$WORK"/s/model.safetensors "$WORK"/s/smol.safetensors 2>/dev/null || true) | wc -c)
python3 -c "print(f'Server RSS with every grid shape used: {$RSS/1e6:.0f} MB = {$RSS/$WEIGHTS:.2f}x the supernet weights ({$WEIGHTS/1e6:.0f} MB)')" | tee -a bench/results/serve.md
