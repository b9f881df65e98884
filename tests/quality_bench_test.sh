#!/usr/bin/env bash
# bench/quality end to end on a tiny model: every stage runs and lands in the report (JSON,
# Markdown, SVG plots that parse), a rerun skips the finished stages, a killed run resumes, and a
# bad corpus directory exits with 2 and names the missing file.
set -u
ADMIN=$1
BENCH=$2
SRC=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
fail() { echo "FAIL: $*"; exit 1; }

/usr/bin/python3 "$SRC/scripts/quality-corpus" "$dir/corpus" --cloze-items 40 2>"$dir/corpus.log" \
  || fail "quality-corpus: $(cat "$dir/corpus.log")"
for f in train.txt calib.txt heldout.txt cloze.jsonl cloze-calib.jsonl; do
  [ -s "$dir/corpus/$f" ] || fail "corpus: no $f"
done
"$ADMIN" init --out "$dir/model" --preset tiny --layers 5 --seed 3 >/dev/null 2>&1 || fail "init"

FLAGS=(--model "$dir/model" --corpus "$dir/corpus" --seeds 1,2 --tune-batch 2
       --seq-len 32 --calib-windows 4 --calib-window-len 32 --dp-windows 2 --eval-windows 2
       --eval-window-len 32 --mc-items 3 --dp-mc-items 2 --threads 1)
"$BENCH" "${FLAGS[@]}" --tune-steps 2 --out "$dir/out" >"$dir/run1.log" 2>&1 || fail "first run: $(tail -20 "$dir/run1.log")"
for f in quality.json quality.md depth.svg width.svg objective.svg; do
  [ -s "$dir/out/$f" ] || fail "no $f"
done
/usr/bin/python3 - "$dir/out" <<'PY' || fail "report contents"
import json, sys, xml.dom.minidom
out = sys.argv[1]
j = json.load(open(f"{out}/quality.json"))
stages = j["stages"]
want = ["calibrate", "width", "depth_dp_accuracy", "depth_untuned", "untuned_grid"]
for seed in (1, 2):
    for v in ["full", "single_lora", "no_distill", "no_balancing", "depth_drop_last",
              "depth_block_influence", "depth_dp_accuracy", "alone_smallest", "alone_middle"]:
        want.append(f"tune_{v}_s{seed}")
missing = [w for w in want if w not in stages]
assert not missing, f"missing stages {missing}"
width = stages["width"]["series"]
assert set(width) == {f"{s}_{a}{b}" for s in ("flap", "magnitude", "removal")
                      for a in ("global", "uniform") for b in ("", "_no_bias")}, width.keys()
# Uniform allocations keep the same units per layer whatever the scores.
for s in ("magnitude_uniform", "removal_uniform"):
    for a, b in zip(width["flap_uniform"], width[s]):
        assert a["params"] == b["params"] and a["channels"] == b["channels"], (a, b)
# Equal budgets: global allocations of one ratio keep the same parameter count to within a unit.
for s in ("magnitude_global", "removal_global"):
    for a, b in zip(width["flap_global"], width[s]):
        assert abs(a["params"] - b["params"]) <= 3 * 64 * 8, (a, b)
# Every score's rank correlation with the measured single-unit removal losses, on every KV group
# (5 layers x 2) and --width-units channels per layer.
corr = stages["width"]["rank_correlations"]
assert set(corr) == {"flap", "magnitude", "removal"}, corr
for kind, r in corr.items():
    assert r["attention_groups"]["units"] == 10 and r["mlp_channels"]["units"] == 5 * 8, r
    for k in ("attention_groups", "mlp_channels"):
        assert -1 <= r[k]["spearman"] <= 1, r
red = stages["width"]["redundancy"]
assert red["mlp_quarter_by_magnitude_perplexity"] != red["full_perplexity"], red
sens = stages["width"]["sensitivity"]
assert len(sens["attention"]) == 5 and all(x > 0 for x in sens["attention"] + sens["mlp"]), sens
assert stages["width"]["calibration"]["window_bos"] is False, stages["width"]["calibration"]
grid = stages["tune_full_s1"]["shapes"]
assert len(grid) == len(stages["untuned_grid"]["shapes"]) and len(grid) >= 4
assert all(r["perplexity"] > 1 for r in grid)
assert len(stages["tune_alone_smallest_s1"]["shapes"]) == 1
md = open(f"{out}/quality.md").read()
for section in ["## Depth", "## Width", "## Tuning objective", "## One for all"]:
    assert section in md, section
for svg in ["depth", "width", "objective"]:
    doc = xml.dom.minidom.parse(f"{out}/{svg}.svg")
    assert doc.getElementsByTagName("polyline"), svg
    assert len(doc.getElementsByTagName("text")) > 10, svg
PY
# A rerun finds every stage done and tunes nothing.
"$BENCH" "${FLAGS[@]}" --tune-steps 2 --out "$dir/out" >"$dir/run2.log" 2>&1 || fail "rerun: $(tail -5 "$dir/run2.log")"
grep -q "quality: tune_" "$dir/run2.log" && fail "rerun tuned again: $(grep 'quality: tune_' "$dir/run2.log")"
# Killed in the middle of the tuning stages, a run continues where it stopped.
"$BENCH" "${FLAGS[@]}" --out "$dir/out2" --tune-steps 30 >"$dir/run3.log" 2>&1 &
pid=$!
for _ in $(seq 1 600); do
  [ -f "$dir/out2/stages/tune_full_s1.json" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
kill -TERM $pid 2>/dev/null
wait $pid
[ -f "$dir/out2/stages/tune_full_s1.json" ] || fail "first tuning stage never finished: $(tail -5 "$dir/run3.log")"
"$BENCH" "${FLAGS[@]}" --out "$dir/out2" --tune-steps 30 >"$dir/run4.log" 2>&1 || fail "resumed run: $(tail -5 "$dir/run4.log")"
grep -q "quality: tune_full_s1 " "$dir/run4.log" && fail "resumed run redid tune_full_s1"
[ -f "$dir/out2/stages/tune_alone_middle_s2.json" ] || fail "resumed run did not finish"

# --stages runs only the named stages (calibrate always); an unknown stage is refused.
"$BENCH" "${FLAGS[@]}" --out "$dir/out5" --stages width >"$dir/run5.log" 2>&1 || fail "--stages width: $(tail -5 "$dir/run5.log")"
[ "$(ls "$dir/out5/stages" | sort | tr '\n' ' ')" = "calibrate.json width.json " ] ||
  fail "--stages width ran: $(ls "$dir/out5/stages")"
"$BENCH" "${FLAGS[@]}" --out "$dir/out5" --stages widht >"$dir/run6.log" 2>&1
[ $? -eq 2 ] && grep -q "widht" "$dir/run6.log" || fail "--stages widht: $(tail -3 "$dir/run6.log")"

# Bad input: exit 2 with a message naming the problem.
mkdir -p "$dir/empty"
"$BENCH" --model "$dir/model" --corpus "$dir/empty" --out "$dir/out3" >"$dir/bad.log" 2>&1
rc=$?
[ $rc -eq 2 ] || fail "missing corpus files: exit $rc"
grep -q "train.txt" "$dir/bad.log" || fail "message does not name the file: $(cat "$dir/bad.log")"
echo "quality bench OK"
