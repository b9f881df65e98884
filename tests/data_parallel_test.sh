#!/usr/bin/env bash
# Two processes on loopback (RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as torchrun sets them), each
# with one micro-batch per step, must train the same adapters (1e-5) as one process accumulating
# two micro-batches per step: the same global batch.
set -u
ADMIN=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }
"$ADMIN" init --out "$dir/m" --preset tiny --layers 4 --seed 5 2>/dev/null || fail init
python3 -c "print(' '.join(['the cat sat on the mat and the dog ran in the park'] * 300))" > "$dir/t.txt"
"$ADMIN" calibrate --model "$dir/m" --data "$dir/t.txt" --out "$dir/s" --windows 4 --window-len 32 \
  --dp-windows 2 >/dev/null 2>&1 || fail calibrate
cp -r "$dir/s" "$dir/one"
cp -r "$dir/s" "$dir/two"
FLAGS="--data $dir/t.txt --steps 4 --batch 2 --seq-len 32 --lr 3e-3 --rank 4 --seed 9"
"$ADMIN" tune --supernet "$dir/one" $FLAGS --grad-accum 2 > "$dir/one.log" 2>&1 || fail "1 process: $(tail -3 "$dir/one.log")"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$PORT
RANK=0 timeout 120 "$ADMIN" tune --supernet "$dir/two" $FLAGS --grad-accum 1 > "$dir/r0.log" 2>&1 &
P0=$!
RANK=1 timeout 120 "$ADMIN" tune --supernet "$dir/two" $FLAGS --grad-accum 1 > "$dir/r1.log" 2>&1 &
P1=$!
wait $P0 || fail "rank 0: $(tail -3 "$dir/r0.log")"
wait $P1 || fail "rank 1: $(tail -3 "$dir/r1.log")"
grep -q "rank 1 of 2" "$dir/r1.log" || fail "rank 1 did not join the process group"
python3 - "$dir/one/smol.safetensors" "$dir/two/smol.safetensors" <<'PY' || exit 1
import json, struct, sys
def load(p):
    b = open(p, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    h = json.loads(b[8:8 + n])
    out = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]
        raw = b[8 + n + s: 8 + n + e]
        out[k] = struct.unpack("<%df" % (len(raw) // 4), raw)
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
assert a.keys() == b.keys()
worst = max(abs(x - y) for k in a for x, y in zip(a[k], b[k]))
moved = max(abs(x) for k in a if "lora_B" in k for x in a[k])
print(f"max |1 process - 2 processes| = {worst:.2e}; adapters moved by up to {moved:.2e}")
if moved < 1e-4: sys.exit("FAIL: training did not change the adapters")
if worst > 1e-5: sys.exit("FAIL: 2 processes differ from 1 process")
print("data_parallel: 1 passed, 0 failed")
PY
