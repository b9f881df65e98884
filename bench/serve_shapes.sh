#!/usr/bin/env bash
# bench/serve, many shapes at once: one supernet of a preset (random weights), two servers on it,
# one with shared steps (every shape in flight in one engine pass) and one stepping each shape on
# its own (--shared-steps false); 16 greedy streams over 1, 2, 4 and 8 distinct shapes against
# each, in interleaved rounds. Only one server works at a time (the other idles).
#   bench/serve_shapes.sh [preset=100m] [extra amoeba-server flags, e.g. --weights-dtype q8_0]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-100m}
shift || true
source bench/serve_lib.sh
make_supernet "$PRESET"
launch_server shared --max-concurrent 16 "$@"
SHARED=$TARGET
launch_server lanes --max-concurrent 16 --shared-steps false "$@"
LANES=$TARGET
run_shape_mix "serve_shapes_$PRESET" "preset $PRESET, server flags: ${*:-none}" "shared steps=$SHARED" "lanes=$LANES"
