#!/usr/bin/env bash
# bench/idle_gap: requests that arrive after an idle spell, pinned threads against unpinned. Two
# servers on one supernet (--pin-threads, the default, and --pin-threads=false), greedy requests
# one at a time with 0.2 s of idle before each; each request's server-side decode ms/token
# against the server's own start-up profile of that shape. Only one server works at a time.
#   bench/idle_gap.sh [supernet dir=the demo's, ~/.cache/amoeba/demo-supernet | preset name]
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/serve_lib.sh
SOURCE=${1:-$HOME/.cache/amoeba/demo-supernet}
if [ -d "$SOURCE" ]; then ln -s "$(realpath "$SOURCE")" "$WORK/s"; else make_supernet "$SOURCE"; fi
# The largest and the smallest shape of the supernet's grid.
read -r FULL SMALL < <(/usr/bin/python3 -c '
import json, sys
a = json.load(open(sys.argv[1]))
d = sorted(a["grid"]["depths"]); w = sorted(a["grid"]["widths"])
f = lambda x: ("%g" % x)
print(f"depth={d[-1]},width={f(w[-1])}", f"depth={d[0]},width={f(w[0])}")' "$WORK/s/amoeba.json")
mkdir -p bench/results
launch_server pinned --http-port 0 "${@:2}"
PINNED="$(cut -d' ' -f3 "$WORK/ports.pinned"):$WORK/server.pinned.log"
launch_server unpinned --http-port 0 --pin-threads=false "${@:2}"
UNPINNED="$(cut -d' ' -f3 "$WORK/ports.unpinned"):$WORK/server.unpinned.log"
CPU=$(lscpu | sed -n 's/^Model name: *//p' | head -n1)
/usr/bin/python3 bench/idle_gap.py --server "pinned=$PINNED" --server "unpinned=$UNPINNED" \
  --shape "$FULL" --shape "$SMALL" --rounds "${ROUNDS:-2}" --requests "${REQUESTS:-8}" \
  --machine "$(nproc) cores, $CPU; supernet $(basename "$SOURCE")" \
  --json bench/results/idle_gap.json --md bench/results/idle_gap.md
