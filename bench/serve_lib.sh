# Shared by bench/serve.sh and bench/serve_rss.sh (sourced, not run): a supernet from a preset and
# a server on a loopback port.
#   start_server PRESET [extra amoeba-server flags...]
# builds the supernet in $WORK (random weights; INIT_ARGS overrides dims; TUNED=1 adds SMoL
# adapters from a one-step tune), starts amoeba-server, sets PID and TARGET, and stops the servers
# and removes $WORK on exit (make_supernet and launch_server do it in two steps, for several
# servers on one supernet).
#   rss_report: prints "RSS ... = Nx the supernet weights" with a breakdown (weights file,
# anonymous memory, shared-library code) of the running server, once it has been idle 1.5 s.
B=build
WORK=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; [ -n "${KEEP_LOGS:-}" ] && cp "$WORK"/server.*.log "$KEEP_LOGS"/ 2>/dev/null; rm -rf "$WORK"' EXIT

# The supernet of a preset in $WORK/s (random weights, calibrated; TUNED=1: one tuning step).
# SUPERNET_CACHE=DIR keeps it there (per preset, tuned or not) for later runs.
make_supernet() {
  local preset=$1
  local cached=${SUPERNET_CACHE:+$SUPERNET_CACHE/$preset-tuned${TUNED:-0}}
  if [ -n "$cached" ] && [ -f "$cached/amoeba.json" ]; then
    ln -s "$cached" "$WORK/s"
    return
  fi
  make_supernet_now "$preset"
  if [ -n "$cached" ]; then
    mkdir -p "$SUPERNET_CACHE"
    rm -rf "$cached" && cp -r "$WORK/s" "$cached"
  fi
}

make_supernet_now() {
  local preset=$1
  # shellcheck disable=SC2086
  $B/admin/amoeba-admin init --out "$WORK/m" --preset "$preset" --seed 1 ${INIT_ARGS:-} > /dev/null 2>&1
  python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 400))" > "$WORK/calib.txt"
  $B/admin/amoeba-admin calibrate --model "$WORK/m" --data "$WORK/calib.txt" --out "$WORK/s" \
    --windows 4 --window-len 64 --dp-windows 2 > /dev/null 2>&1
  if [ "${TUNED:-0}" = 1 ]; then
    $B/admin/amoeba-admin tune --supernet "$WORK/s" --data "$WORK/calib.txt" --steps 1 --batch 1 \
      --seq-len 32 --subnets 2 > /dev/null 2>&1
  fi
}

# Starts amoeba-server NAME on $WORK/s with extra flags; sets PID and TARGET.
launch_server() {
  local name=$1
  shift
  $B/server/amoeba-server --supernet "$WORK/s" --host 127.0.0.1 --port 0 --metrics-port -1 \
    --port-file "$WORK/ports.$name" --max-context 256 "$@" > "$WORK/server.$name.log" 2>&1 &
  PID=$!
  PIDS+=("$PID")
  for _ in $(seq 1 1200); do [ -s "$WORK/ports.$name" ] && break; sleep 0.5; done
  TARGET="127.0.0.1:$(cut -d' ' -f1 "$WORK/ports.$name")"
}

start_server() {
  make_supernet "$1"
  shift
  launch_server main "$@"
}

rss_report() {
  local label=$1
  # The scheduler keeps finished sequences' KV memory and its activations for --idle-trim-ms
  # (1000) after the last request, for the next ones: measure after it has handed them back.
  sleep 1.5
  # The supernet's weight bytes: the model, plus the SMoL adapters when tuned.
  local weights rss
  weights=$( (cat "$WORK"/s/model.safetensors "$WORK"/s/smol.safetensors 2>/dev/null || true) | wc -c)
  rss=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/$PID/status")
  awk -v rss="$rss" -v w="$weights" -v label="$label" '
    /^[0-9a-f]+-[0-9a-f]+ / {name = $6}
    /^Rss/ {if (name ~ /safetensors/) f += $2; else if (name ~ /\.so/) l += $2; else a += $2}
    END {printf "%s: RSS %.0f MB = %.2fx the supernet weights (%.0f MB); weights file %.0f MB, anonymous %.0f MB, shared libraries %.0f MB\n",
         label, rss / 1e6, rss / w, w / 1e6, f / 1024, a / 1024, l / 1024}' "/proc/$PID/smaps"
}

# 16 greedy streams over 1, 2, 4 and 8 distinct shapes against two servers, interleaved rounds:
#   run_shape_mix RESULT_NAME MACHINE_NOTE "label=HOST:PORT" "label=HOST:PORT"
run_shape_mix() {
  local name=$1 note=$2
  shift 2
  local cpu
  cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n1)
  $B/bench/amoeba-bench-serve --shape-mix "$@" \
    --rounds "${ROUNDS:-3}" --tokens "${TOKENS:-32}" --requests "${REQUESTS:-2}" \
    --machine "$(nproc) cores, $cpu; $note" \
    --json "bench/results/$name.json" --md "bench/results/$name.md"
}
