#!/usr/bin/env bash
# amoeba-admin end to end: init writes a loadable model, generate streams tokens, bad input
# exits with 2 and a message naming the problem.
set -u
ADMIN=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

"$ADMIN" init --out "$dir/m" --preset tiny --seed 3 || fail "init"
for f in config.json model.safetensors tokenizer.json; do [ -f "$dir/m/$f" ] || fail "missing $f"; done
out=$("$ADMIN" generate --model "$dir/m" -n 8 --seed 1 --temperature 0.7 "Hello" 2>"$dir/err") || fail "generate"
[[ "$out" == Hello* ]] || fail "output does not start with the prompt: $out"
grep -q "8 new tokens" "$dir/err" || grep -q "finish=eos" "$dir/err" || fail "no token report: $(cat "$dir/err")"
grep -q "tok/s" "$dir/err" || fail "no tokens/s"
# Same seed, same output.
out2=$("$ADMIN" generate --model "$dir/m" -n 8 --seed 1 --temperature 0.7 "Hello" 2>/dev/null)
[ "$out" == "$out2" ] || fail "not deterministic"
# fp16 weights and an fp16 KV cache run too (greedy, a few tokens).
"$ADMIN" generate --model "$dir/m" -n 6 --weights-dtype f16 --kv-dtype f16 "Hello" >/dev/null 2>"$dir/err16" \
  || fail "generate with f16 weights and KV cache: $(cat "$dir/err16")"
# Prefill attention in fp32 on request (bf16 on AMX tiles by default where the CPU has them).
"$ADMIN" generate --model "$dir/m" -n 6 --prefill-attention fp32 "Hello" >/dev/null 2>"$dir/errp" \
  || fail "generate with fp32 prefill attention: $(cat "$dir/errp")"
# The block formats too.
for q in q8_0 q4_0; do
  "$ADMIN" generate --model "$dir/m" -n 6 --weights-dtype $q "Hello" >/dev/null 2>"$dir/errq" \
    || fail "generate with $q weights: $(cat "$dir/errq")"
done

expect_2() {
  local what=$1; shift
  "$@" >"$dir/o" 2>&1
  local rc=$?
  [ $rc -eq 2 ] || fail "$what: exit $rc, want 2 ($(cat "$dir/o"))"
}
expect_2 "missing model" "$ADMIN" generate --model "$dir/nope" "x"
expect_2 "bad top-p" "$ADMIN" generate --model "$dir/m" --top-p 1.5 "x"
expect_2 "negative temperature" "$ADMIN" generate --model "$dir/m" --temperature -1 "x"
expect_2 "unknown flag" "$ADMIN" generate --model "$dir/m" --bogus "x"
expect_2 "bad KV dtype" "$ADMIN" generate --model "$dir/m" --kv-dtype f8 "x"
expect_2 "bad prefill attention" "$ADMIN" generate --model "$dir/m" --prefill-attention bf8 "x"
expect_2 "bad weights dtype" "$ADMIN" generate --model "$dir/m" --weights-dtype q3_k "x"
grep -q "q8_0" "$dir/o" || fail "message should list the weights dtypes: $(cat "$dir/o")"
expect_2 "quantized baseline" "$ADMIN" generate --model "$dir/m" --weights-dtype q8_0 --baseline "x"
expect_2 "unknown preset" "$ADMIN" init --out "$dir/z" --preset huge
grep -q "unknown preset" "$dir/o" || fail "message should name the preset"
[ ! -e "$dir/z" ] || fail "failed init left a directory"
printf 'garbage' > "$dir/m/model.safetensors"
expect_2 "corrupt weights" "$ADMIN" generate --model "$dir/m" "x"
grep -q "model.safetensors" "$dir/o" || fail "message should name the file"

# calibrate → export → generate on the export.
"$ADMIN" init --out "$dir/m2" --preset tiny --layers 5 --seed 4 || fail "init m2"
python3 -c "print(' '.join(['the quick brown fox jumps over the lazy dog'] * 200))" > "$dir/calib.txt"
"$ADMIN" calibrate --model "$dir/m2" --data "$dir/calib.txt" --out "$dir/s" --windows 4 --window-len 32 \
  --dp-windows 2 > "$dir/table" 2>"$dir/err" || fail "calibrate: $(cat "$dir/err")"
grep -q "block_influence" "$dir/table" || fail "calibrate prints the DP vs baselines table"
[ -f "$dir/s/amoeba.json" ] && [ -f "$dir/s/width.safetensors" ] || fail "supernet files"
expect_2 "calibrate over an existing supernet" "$ADMIN" calibrate --model "$dir/m2" --data "$dir/calib.txt" --out "$dir/s"
"$ADMIN" export --supernet "$dir/s" --shape depth=3,width=0.625 --out "$dir/e" 2>"$dir/err" || fail "export: $(cat "$dir/err")"
"$ADMIN" generate --model "$dir/e" -n 4 "Hi" >/dev/null 2>&1 || fail "generate on the export"
expect_2 "shape off the grid" "$ADMIN" export --supernet "$dir/s" --shape depth=2 --out "$dir/e2"
grep -q "shape.depth" "$dir/o" || fail "message names shape.depth"
[ ! -e "$dir/e2" ] || fail "failed export left a directory"
expect_2 "not a supernet" "$ADMIN" export --supernet "$dir/m2" --shape depth=3 --out "$dir/e3"

# A kill -9 mid-write leaves "<file>.tmp.<pid>.<n>": the next tune removes those of dead processes.
touch "$dir/s/smol.safetensors.tmp.4194305.77" "$dir/s/amoeba.json.tmp.$$.1"
# tune with each ablation switch, then eval writes the profile and the frontier plot.
for ablation in "" --single-lora --no-balancing --no-distill; do
  "$ADMIN" tune --supernet "$dir/s" --data "$dir/calib.txt" --steps 2 --batch 2 --seq-len 16 $ablation \
    --checkpoint "$dir/ck$ablation.safetensors" >"$dir/o" 2>&1 || fail "tune $ablation: $(tail -2 "$dir/o")"
done
"$ADMIN" tune --supernet "$dir/s" --data "$dir/calib.txt" --steps 2 --batch 2 --seq-len 16 --single-lora \
  --checkpoint "$dir/ck1.safetensors" >/dev/null 2>&1
[ ! -e "$dir/s/smol.safetensors.tmp.4194305.77" ] || fail "tune should remove stale temp files"
[ -e "$dir/s/amoeba.json.tmp.$$.1" ] || fail "tune must keep the temp files of live processes"
rm -f "$dir/s/amoeba.json.tmp.$$.1"
python3 -c "import json,sys; j=json.load(open('$dir/s/amoeba.json')); sys.exit(0 if j['smol']['experts']==1 else 1)" \
  || fail "--single-lora should record one expert"
# --targets: only the named projections get adapters (the tensors in smol.safetensors say so).
"$ADMIN" tune --supernet "$dir/s" --data "$dir/calib.txt" --steps 1 --batch 2 --seq-len 16 \
  --targets q,v_proj --checkpoint "$dir/ck2.safetensors" >/dev/null 2>&1 || fail "tune --targets"
/usr/bin/python3 -c "
import json, struct, sys
f = open('$dir/s/smol.safetensors', 'rb'); n = struct.unpack('<Q', f.read(8))[0]
names = [k for k in json.loads(f.read(n)) if 'lora_A' in k]
ok = names and all(('q_proj' in k or 'v_proj' in k) for k in names) and any('v_proj' in k for k in names)
sys.exit(0 if ok else 1)" || fail "--targets q,v_proj should adapt only q_proj and v_proj"
expect_2 "unknown --targets" "$ADMIN" tune --supernet "$dir/s" --data "$dir/calib.txt" --steps 1 --targets qq
"$ADMIN" eval --supernet "$dir/s" --data "$dir/calib.txt" --windows 2 --window-len 16 > "$dir/eval" 2>&1 || fail "eval"
[ -s "$dir/s/frontier.svg" ] || fail "eval writes frontier.svg"
python3 -c "import json,sys; j=json.load(open('$dir/s/amoeba.json')); sys.exit(0 if all('heldout_perplexity' in p for p in j['profile']) else 1)" \
  || fail "eval fills the profile"
# eval --weights-dtype: perplexity and KL divergence of the q8_0-decoded shapes next to fp32.
"$ADMIN" eval --supernet "$dir/s" --data "$dir/calib.txt" --windows 2 --window-len 16 --weights-dtype q8_0 > "$dir/evalq" 2>&1 \
  || fail "eval --weights-dtype q8_0: $(cat "$dir/evalq")"
grep -q "KL to f32" "$dir/evalq" || fail "eval q8_0 prints the KL divergence: $(cat "$dir/evalq")"
expect_2 "eval bad weights dtype" "$ADMIN" eval --supernet "$dir/s" --data "$dir/calib.txt" --weights-dtype int3
# eval --draft-weights-dtype: every shape also timed as a q4_0 draft copy, stored in the profile.
"$ADMIN" eval --supernet "$dir/s" --data "$dir/calib.txt" --windows 2 --window-len 16 --draft-weights-dtype q4_0 \
  > "$dir/evald" 2>&1 || fail "eval --draft-weights-dtype q4_0: $(cat "$dir/evald")"
python3 -c "import json,sys; j=json.load(open('$dir/s/amoeba.json')); sys.exit(0 if all(p['decode_ms_by_dtype']['q4_0'] > 0 for p in j['profile']) else 1)" \
  || fail "eval --draft-weights-dtype stores q4_0 draft timings"
expect_2 "eval bad draft dtype" "$ADMIN" eval --supernet "$dir/s" --data "$dir/calib.txt" --draft-weights-dtype int3
expect_2 "calibrate bad width scores" "$ADMIN" calibrate --model "$dir/m2" --data "$dir/calib.txt" --out "$dir/s9" --width-scores random
# A corrupt amoeba.json or missing adapters: exit 2 with the field named, never an abort.
cp "$dir/s/amoeba.json" "$dir/good.json"
sed -i 's/"kv_groups": \[/"kv_groups": [-1, /' "$dir/s/amoeba.json"
expect_2 "corrupt width table" "$ADMIN" export --supernet "$dir/s" --shape depth=3 --out "$dir/e4"
grep -q "kv_groups" "$dir/o" || fail "message names kv_groups"
cp "$dir/good.json" "$dir/s/amoeba.json"
mv "$dir/s/smol.safetensors" "$dir/smol.bak"
expect_2 "adapters named but missing" "$ADMIN" eval --supernet "$dir/s" --data "$dir/calib.txt"
grep -q "smol.safetensors is missing" "$dir/o" || fail "message names smol.safetensors"
mv "$dir/smol.bak" "$dir/s/smol.safetensors"
# Export of the tuned supernet merges the adapters by default; --no-adapters is the base subnet.
"$ADMIN" export --supernet "$dir/s" --shape depth=3 --out "$dir/t1" >"$dir/o" 2>&1 || fail "tuned export"
grep -q "adapters merged" "$dir/o" || fail "tuned export should say the adapters are merged"
"$ADMIN" export --supernet "$dir/s" --shape depth=3 --out "$dir/t2" --no-adapters >/dev/null 2>&1 || fail "export --no-adapters"
cmp -s "$dir/t1/model.safetensors" "$dir/t2/model.safetensors" && fail "--no-adapters should differ from the tuned export"
# GGUF export for llama.cpp in every dtype; the file generates through amoeba-admin too.
for q in f32 f16 q8_0 q4_0; do
  "$ADMIN" export --supernet "$dir/s" --shape depth=3 --format gguf --dtype $q --out "$dir/t.$q.gguf" >"$dir/o" 2>&1 \
    || fail "gguf export $q: $(cat "$dir/o")"
  grep -q "GGUF" "$dir/o" || fail "gguf export says what it wrote"
  "$ADMIN" generate --model "$dir/t.$q.gguf" -n 4 "Hello" >/dev/null 2>"$dir/o" \
    || fail "generate from $q gguf: $(cat "$dir/o")"
done
[ "$(stat -c %s "$dir/t.q4_0.gguf")" -lt "$(stat -c %s "$dir/t.q8_0.gguf")" ] || fail "q4_0 file should be smaller than q8_0"
expect_2 "gguf bf16" "$ADMIN" export --supernet "$dir/s" --shape depth=3 --format gguf --dtype bf16 --out "$dir/x.gguf"
expect_2 "hf q8_0" "$ADMIN" export --supernet "$dir/s" --shape depth=3 --dtype q8_0 --out "$dir/x"
expect_2 "unknown format" "$ADMIN" export --supernet "$dir/s" --shape depth=3 --format onnx --out "$dir/x"
# A GGUF file calibrates like an HF model (the full shape, base weights: a plain llama file);
# a pruned (deci) file is refused.
"$ADMIN" export --supernet "$dir/s" --shape depth=5,width=1 --no-adapters --format gguf --dtype f32 --out "$dir/full.gguf" >/dev/null 2>&1 \
  || fail "full-shape gguf export"
"$ADMIN" calibrate --model "$dir/full.gguf" --data "$dir/calib.txt" --out "$dir/sg" --windows 4 --window-len 32 --dp-windows 2 >"$dir/o" 2>&1 \
  || fail "calibrate from gguf: $(cat "$dir/o")"
[ -f "$dir/sg/amoeba.json" ] || fail "calibrate from gguf writes a supernet"
[ -f "$dir/sg/tokenizer.json" ] || fail "calibrate from gguf writes the file's tokenizer"
"$ADMIN" export --supernet "$dir/s" --shape depth=3,width=0.75 --format gguf --out "$dir/deci.gguf" >"$dir/o" 2>&1 || fail "deci export"
grep -q "deci" "$dir/o" || fail "a narrower shape is a deci file: $(cat "$dir/o")"
expect_2 "calibrate a pruned gguf" "$ADMIN" calibrate --model "$dir/deci.gguf" --tokenizer "$dir/s" --data "$dir/calib.txt" --out "$dir/sd"
# convert: any HF model directory to GGUF; it generates the same greedy text as the directory.
"$ADMIN" convert --model "$dir/m2" --out "$dir/m.gguf" --dtype f32 >/dev/null 2>&1 || fail "convert"
want=$("$ADMIN" generate --model "$dir/m2" -n 6 "Hello" 2>/dev/null)
got=$("$ADMIN" generate --model "$dir/m.gguf" --tokenizer "$dir/m2" -n 6 "Hello" 2>/dev/null)
[ "$want" == "$got" ] || fail "converted f32 GGUF generates differently: '$want' vs '$got'"
expect_2 "convert bad dtype" "$ADMIN" convert --model "$dir/m2" --out "$dir/x.gguf" --dtype q2_k
printf 'GGUFjunk' > "$dir/junk.gguf"
expect_2 "corrupt gguf" "$ADMIN" generate --model "$dir/junk.gguf" --tokenizer "$dir/s" "x"
grep -q "junk.gguf" "$dir/o" || fail "the message names the gguf file: $(cat "$dir/o")"
expect_2 "tune on a plain model" "$ADMIN" tune --supernet "$dir/m2" --data "$dir/calib.txt" --steps 1
# pretrain writes a loadable model; --resume continues from its checkpoint.
"$ADMIN" pretrain --model "$dir/m2" --data "$dir/calib.txt" --out "$dir/p" --steps 3 --batch 2 --seq-len 16 \
  >/dev/null 2>&1 || fail "pretrain"
"$ADMIN" generate --model "$dir/p" -n 2 "Hi" >/dev/null 2>&1 || fail "generate on the pretrained model"
# --heldout: held-out perplexity every --eval-every steps and at the end, in the training report.
"$ADMIN" pretrain --model "$dir/m2" --data "$dir/calib.txt" --out "$dir/ph" --steps 5 --batch 2 \
  --seq-len 16 --heldout "$dir/calib.txt" --eval-every 2 --eval-windows 3 >/dev/null 2>&1 ||
  fail "pretrain --heldout"
/usr/bin/python3 - "$dir/ph/pretrain_report.json" <<'PY' || fail "pretrain report: $(cat "$dir/ph/pretrain_report.json")"
import json, sys
r = json.load(open(sys.argv[1]))
steps = [p["step"] for p in r["heldout"]]
assert steps == [2, 4, 5], steps
assert all(p["perplexity"] > 1 for p in r["heldout"]), r
assert r["tokens"] == 5 * 2 * 16 and abs(r["tokens_per_param"] * r["params"] - r["tokens"]) < 1e-6, r
assert r["heldout_perplexity"] == r["heldout"][-1]["perplexity"], r
assert "converged" in r and "last_fifth_gain" in r, r
PY
expect_2 "pretrain --eval-every 0" "$ADMIN" pretrain --model "$dir/m2" --data "$dir/calib.txt" --out "$dir/px" \
  --steps 2 --heldout "$dir/calib.txt" --eval-every 0
echo "admin_cli: 1 passed, 0 failed"
