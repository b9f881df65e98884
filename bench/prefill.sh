#!/usr/bin/env bash
# bench/prefill side by side with llama.cpp's llama-bench on the same GGUF file: a preset model
# with random weights (amoeba-admin init), written as GGUF (amoeba-admin convert), prefilled by
# amoeba-bench-prefill and, when LLAMA_BENCH names a llama-bench binary, by llama-bench (-p the
# same lengths, -n 0, the same rounds and threads). Results in bench/results/prefill*.
#   LLAMA_BENCH=/path/llama-bench bench/prefill.sh [preset=100m] [dtype=q8_0]
# LENGTHS (default 128,256,512,1024,2048,4096), ROUNDS (3), CHUNK (0 = whole prompt) override.
set -euo pipefail
cd "$(dirname "$0")/.."
B=${AMOEBA_BUILD_DIR:-build}
PRESET=${1:-100m}
DTYPE=${2:-q8_0}
LENGTHS=${LENGTHS:-128,256,512,1024,2048,4096}
ROUNDS=${ROUNDS:-3}
CHUNK=${CHUNK:-0}
dir=bench/results/prefill-models
mkdir -p "$dir"
[ -f "$dir/$PRESET/config.json" ] || "$B/admin/amoeba-admin" init --out "$dir/$PRESET" --preset "$PRESET" --seed 1
gguf="$dir/$PRESET-$DTYPE.gguf"
[ -f "$gguf" ] || "$B/admin/amoeba-admin" convert --model "$dir/$PRESET" --out "$gguf" --dtype "$DTYPE"
"$B/bench/amoeba-bench-prefill" --model "$gguf" --weights-dtype "$DTYPE" --lengths "$LENGTHS" \
  --rounds "$ROUNDS" --chunk "$CHUNK" --out bench/results/prefill
if [ -n "${LLAMA_BENCH:-}" ]; then
  "$LLAMA_BENCH" -m "$gguf" -p "$LENGTHS" -n 0 -r "$ROUNDS" -t "$(nproc)" -o json \
    > bench/results/prefill-llama-bench.json
  /usr/bin/python3 - <<'PY'
import json
a = json.load(open("bench/results/prefill.json"))
l = {r["n_prompt"]: r for r in json.load(open("bench/results/prefill-llama-bench.json"))}
rows = ["| prompt tokens | amoeba tok/s (median, min-max) | llama-bench tok/s (mean ± sd) | amoeba / llama.cpp |",
        "|---|---|---|---|"]
for r in a["results"]:
    n, m = r["prompt_tokens"], r["tokens_per_s_median"]
    lb = l.get(n)
    lt = f"{lb['avg_ts']:.0f} ± {lb['stddev_ts']:.0f}" if lb else "-"
    ratio = f"{m / lb['avg_ts']:.2f}x" if lb else "-"
    rows.append(f"| {n} | {m:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) | {lt} | {ratio} |")
md = (f"bench/prefill vs llama-bench: {a['model']}, {a['weights_dtype']}, {a['cpu']}, "
      f"{a['rounds']} rounds\n\n" + "\n".join(rows) + "\n")
open("bench/results/prefill-vs-llama.md", "w").write(md)
print(md)
PY
fi
