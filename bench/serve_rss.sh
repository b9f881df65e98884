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
source bench/serve_lib.sh
start_server "$PRESET" "$@"
SHAPES=$($B/client/amoeba-cli --target "$TARGET" shapes | awk 'NR > 1 {print "depth=" $1 ",width=" $2}')
CLIENTS=()
for s in $SHAPES; do
  $B/client/amoeba-cli --target "$TARGET" generate --shape "$s" -n 8 "hello there" > /dev/null 2>&1 &
  CLIENTS+=($!)
done
wait "${CLIENTS[@]}"
rss_report "$PRESET ${INIT_ARGS:-} tuned=${TUNED:-0}: $(grep -c "new lane" "$WORK/server.main.log") shapes in use"
