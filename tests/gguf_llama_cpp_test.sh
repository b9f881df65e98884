#!/usr/bin/env bash
# Every GGUF export kind, checked by the program that will run it: llama.cpp (npm's
# node-llama-cpp prebuilt CPU binaries, installed by scripts/setup) decodes each exported file
# greedily from the prompt ids Amoeba used, and must produce Amoeba's tokens on the same file.
# Kinds: `deci` (per-layer widths) and `llama` (--uniform-width) in f16, q8_0 and q4_0, from a
# supernet with SMoL adapters (merged into the export) and byte-level BPE, and from one with a
# SentencePiece tokenizer. The models are tiny, pretrained for a few steps on Debian's fortunes
# so that their greedy text is not one token repeated.
# Usage: gguf_llama_cpp_test.sh AMOEBA_ADMIN NODE_DIR
set -euo pipefail
admin=$1
node_dir=$2
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -d "$node_dir/node_modules/node-llama-cpp" ]; then
  echo "FAIL: node-llama-cpp is not installed in $node_dir (scripts/setup installs it)"
  echo "0 passed, 1 failed"
  exit 1
fi
cp "$here/llama_cpp/greedy.mjs" "$node_dir/greedy.mjs"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
q() { "$admin" "$@" > "$work/log" 2>&1 || { cat "$work/log"; exit 1; }; }

cat /usr/share/games/fortunes/fortunes /usr/share/games/fortunes/literature \
  /usr/share/games/fortunes/science 2>/dev/null | head -c 400000 > text.txt
[ -s text.txt ] || { echo "FAIL: no fortunes text"; exit 1; }

# Byte-level BPE, tuned (adapters merged into exports).
q init --out bpe --preset tiny --seed 3
q pretrain --model bpe --data text.txt --steps 60 --batch 8 --seq-len 64 --lr 3e-3
q calibrate --model bpe --data text.txt --out bpe-super --windows 8 --window-len 64 --dp-windows 4
q tune --supernet bpe-super --data text.txt --steps 8 --batch 4 --seq-len 64 --experts 2 --rank 4 \
  --lr 1e-2
# SentencePiece.
q init --out sp --preset tiny --train-tokenizer text.txt --tokenizer-vocab 400 --seed 4
q pretrain --model sp --data text.txt --steps 60 --batch 8 --seq-len 64 --lr 3e-3
q calibrate --model sp --data text.txt --out sp-super --windows 8 --window-len 64 --dp-windows 4

exports=()
for dtype in f16 q8_0 q4_0; do
  q export --supernet bpe-super --shape depth=3,width=0.75 --format gguf --dtype $dtype \
    --out bpe-deci-$dtype.gguf
  q export --supernet bpe-super --shape depth=3,width=0.75 --uniform-width --format gguf \
    --dtype $dtype --out bpe-llama-$dtype.gguf
  exports+=(bpe-deci-$dtype bpe-llama-$dtype)
done
q export --supernet bpe-super --shape width=1 --format gguf --dtype f16 --out bpe-full-f16.gguf
q export --supernet sp-super --shape depth=3,width=0.75 --format gguf --out sp-deci-f16.gguf
q export --supernet sp-super --shape depth=3,width=0.75 --uniform-width --format gguf \
  --out sp-llama-f16.gguf
exports+=(bpe-full-f16 sp-deci-f16 sp-llama-f16)

# Amoeba's greedy tokens for every (export, prompt), then llama.cpp's for all of them in one node
# process (loading its bindings costs more than a tiny model's decode).
prompts=("The meaning of life is" "Once upon a time" "Q: Why?")
: > ours.jsonl
for e in "${exports[@]}"; do
  for prompt in "${prompts[@]}"; do
    "$admin" generate --model "$e.gguf" --json -n 16 --temperature 0 --threads 2 "$prompt" \
      > one.json 2> "$work/log" || { cat "$work/log"; exit 1; }
    python3 -c 'import json,sys; d=json.load(open("one.json")); d["export"]=sys.argv[1]; d["prompt"]=sys.argv[2]; print(json.dumps(d))' \
      "$e" "$prompt" >> ours.jsonl
  done
done
python3 -c '
import json, sys
jobs = [{"model": sys.argv[1] + "/" + d["export"] + ".gguf", "prompt": d["prompt_ids"], "n": 16}
        for d in map(json.loads, open("ours.jsonl"))]
json.dump(jobs, open("jobs.json", "w"))' "$work"
(cd "$node_dir" && node greedy.mjs "$work/jobs.json" > "$work/theirs.json" 2> "$work/log") ||
  { echo "FAIL: llama.cpp did not run:"; cat "$work/log"; echo "0 passed, 1 failed"; exit 1; }
python3 - <<'EOF'
import json
ours = [json.loads(line) for line in open("ours.jsonl")]
theirs = json.load(open("theirs.json"))
passed = failed = 0
for a, b in zip(ours, theirs):
    name, prompt = a["export"], a["prompt"]
    if "error" in b:
        print(f"FAIL: llama.cpp could not run {name}.gguf: {b['error']}")
        failed += 1
        continue
    # llama.cpp stops at an end-of-generation token without returning it; Amoeba returns EOS.
    mine = a["tokens"][:len(b["tokens"])] if a["finish_reason"] == "eos" else a["tokens"]
    if mine == b["tokens"] and b["tokens"]:
        passed += 1
        continue
    # The first difference may only be a near-tie: Amoeba's top-1 and top-2 logits closer there
    # than the two engines' rounding (activations quantized per block in q8_0/q4_0, fp16 products).
    i = next((k for k in range(min(len(mine), len(b["tokens"]))) if mine[k] != b["tokens"][k]), None)
    tie = 0.02 if "-f16" in name else 0.05
    if i is not None and a["margins"][i] < tie:
        print(f"  {name}: same {i} tokens, then a near-tie (margin {a['margins'][i]:.4f} < {tie})")
        passed += 1
        continue
    print(f"FAIL: {name} {prompt!r}: Amoeba {a['tokens']}\n      llama.cpp {b['tokens']}")
    failed += 1
if len(theirs) != len(ours):
    print(f"FAIL: llama.cpp answered {len(theirs)} of {len(ours)} jobs")
    failed += 1
print(f"checked {len(ours)} decodes of {len({a['export'] for a in ours})} GGUF files")
print(f"{passed} passed, {failed} failed")
raise SystemExit(1 if failed else 0)
EOF
