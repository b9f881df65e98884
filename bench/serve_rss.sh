#!/usr/bin/env bash
# Server memory with every grid shape in use at once: builds a supernet from a preset (random
# weights; INIT_ARGS overrides dims, e.g. "--layers 6"), starts amoeba-server, sends one request
# per grid shape concurrently, and reports resident memory against the supernet's weight bytes,
# with a breakdown (mapped weights file, anonymous memory, shared-library code).
#   INIT_ARGS="--layers 6" TUNED=1 bench/serve_rss.sh tinyllama [extra amoeba-server flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-100m}
shift || true
B=build
WORK=$(mktemp -d)
trap 'kill -TERM ${PID:-0} 2>/dev/null || true; rm -rf "$WORK"' EXIT
# shellcheck disable=SC2086
$B/admin/amoeba-admin init --out "$WORK/m" --preset "$PRESET" --seed 1 ${INIT_ARGS:-} > /dev/null 2>&1
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
for _ in $(seq 1 1200); do [ -s "$WORK/ports" ] && break; sleep 0.5; done
TARGET="127.0.0.1:$(cut -d' ' -f1 "$WORK/ports")"
SHAPES=$($B/client/amoeba-cli --target "$TARGET" shapes | awk 'NR > 1 {print "depth=" $1 ",width=" $2}')
CLIENTS=()
for s in $SHAPES; do
  $B/client/amoeba-cli --target "$TARGET" generate --shape "$s" -n 8 "hello there" > /dev/null 2>&1 &
  CLIENTS+=($!)
done
wait "${CLIENTS[@]}"
RSS=$(awk '/VmRSS/ {print $2 * 1024}' /proc/$PID/status)
WEIGHTS=$( (cat "$WORK"/s/model.safetensors "$WORK"/s/smol.safetensors 2>/dev/null || true) | wc -c)
LANES=$(grep -c "new lane" "$WORK/server.log")
awk -v rss="$RSS" -v w="$WEIGHTS" -v lanes="$LANES" -v preset="$PRESET ${INIT_ARGS:-} tuned=${TUNED:-0}" '
  /^[0-9a-f]+-[0-9a-f]+ / {name = $6}
  /^Rss/ {if (name ~ /safetensors/) f += $2; else if (name ~ /\.so/) l += $2; else a += $2}
  END {printf "%s: %d shapes in use, RSS %.0f MB = %.2fx the supernet weights (%.0f MB); weights file %.0f MB, anonymous %.0f MB, shared libraries %.0f MB\n",
       preset, lanes, rss / 1e6, rss / w, w / 1e6, f / 1024, a / 1024, l / 1024}' "/proc/$PID/smaps"
