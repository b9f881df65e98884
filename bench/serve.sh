#!/usr/bin/env bash
# bench/serve end to end: builds a supernet from a preset (random weights), starts amoeba-server on a
# loopback port, runs the load generator, reports the server's resident memory afterwards next to
# the supernet's weight bytes, and stops the server.
#   bench/serve.sh [preset=tiny|100m] [extra amoeba-server flags...]
# TUNED=1 adds SMoL adapters (a one-step tune): never-seen shapes then run with the adapters
# unmerged while a merged copy is built in the background (pass --merge-after 1 to build it on the
# first request).
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=${1:-100m}
shift || true
source bench/serve_lib.sh
start_server "$PRESET" "$@"
$B/bench/amoeba-bench-serve --target "$TARGET"
rss_report "After the load ($PRESET, tuned=${TUNED:-0}, server flags: ${*:-none})" | tee -a bench/results/serve.md
