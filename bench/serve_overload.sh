#!/usr/bin/env bash
# bench/serve under overload: one supernet of a preset (random weights), two servers on it with
# shared steps, one planning budget requests against the load in flight (the default) and one
# from the idle profile alone (--plan-under-load false); open-loop arrivals at FACTOR (2) times
# the full shape's capacity, half of them with a decode-latency budget, in interleaved rounds.
#   bench/serve_overload.sh [preset=100m] [extra amoeba-server flags, e.g. --weights-dtype q8_0]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-100m}
shift || true
source bench/serve_lib.sh
make_supernet "$PRESET"
launch_server load --queue-size 256 "$@"
LOAD=$TARGET
launch_server idle --queue-size 256 --plan-under-load false "$@"
IDLE=$TARGET
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -n1)
$B/bench/amoeba-bench-serve --overload "planned under load=$LOAD" "idle profile=$IDLE" \
  --rounds "${ROUNDS:-2}" --factor "${FACTOR:-2}" --seconds "${SECONDS_PER_ROUND:-15}" \
  --tokens "${TOKENS:-32}" \
  --machine "$(nproc) cores, $CPU; preset $PRESET, server flags: ${*:-none}" \
  --json "bench/results/serve_overload_$PRESET.json" --md "bench/results/serve_overload_$PRESET.md"
