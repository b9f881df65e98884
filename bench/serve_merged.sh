#!/usr/bin/env bash
# bench/serve, merged copies in shared steps: one tuned supernet of a preset (random weights, SMoL
# adapters from a one-step tune), two servers with shared steps, one building merged copies of
# hot shapes (the default, --merge-after 2) and one running every shape on the supernet's panels
# with its adapters unmerged (--merge-after 0); 16 greedy streams over 1, 2, 4 and 8 distinct
# shapes against each, in interleaved rounds. Only one server works at a time.
#   bench/serve_merged.sh [preset=100m] [extra amoeba-server flags, e.g. --weights-dtype q8_0]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-100m}
shift || true
export TUNED=1
source bench/serve_lib.sh
make_supernet "$PRESET"
launch_server merged --max-concurrent 16 "$@"
MERGED=$TARGET
launch_server views --max-concurrent 16 --merge-after 0 "$@"
VIEWS=$TARGET
run_shape_mix "serve_merged_$PRESET" "preset $PRESET, tuned, server flags: ${*:-none}" "merged copies=$MERGED" "views only=$VIEWS"
