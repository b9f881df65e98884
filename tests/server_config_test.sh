#!/usr/bin/env bash
# amoeba-server's one configuration: --print-config prints a file that --config reads back to the
# same configuration; flag > file > environment > default; unknown keys and bad values are exit 2
# with a message naming them. (--print-config exits before the supernet is loaded.)
# Usage: server_config_test.sh AMOEBA_SERVER
set -uo pipefail
server=$1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
check() {  # description, then the command; passes when it exits 0
  local what=$1
  shift
  if "$@"; then passed=$((passed + 1)); else echo "FAIL: $what"; failed=$((failed + 1)); fi
}
value() { grep -E "^$1=" "$2" | head -1 | cut -d= -f2-; }

"$server" --supernet /x --print-config > "$work/default.toml"
check "defaults come from the option structs" \
  test "$(value max-concurrent "$work/default.toml")" = 16 -a \
  "$(value max-context "$work/default.toml")" = 2048 -a \
  "$(value weights-dtype "$work/default.toml")" = '"f32"'

"$server" --supernet /x --weights-dtype q8_0 --max-concurrent 4 --model-alias a=depth=3 \
  --model-alias b=depth=4 --print-config > "$work/a.toml"
"$server" --config "$work/a.toml" --print-config > "$work/b.toml"
check "print-config output reads back to the same configuration" cmp -s "$work/a.toml" "$work/b.toml"
check "a list option round-trips" grep -q '^model-alias=\["a=depth=3", "b=depth=4"\]' "$work/b.toml"

printf 'supernet = "/y"\nport = 7\nqueue-size = 9\n' > "$work/c.toml"
AMOEBA_PORT=8 AMOEBA_QUEUE_SIZE=10 AMOEBA_PREFILL_CHUNK=5 "$server" --config "$work/c.toml" \
  --queue-size 11 --print-config > "$work/d.toml"
check "a flag beats the file" test "$(value queue-size "$work/d.toml")" = 11
check "the file beats the environment" test "$(value port "$work/d.toml")" = 7
check "the environment beats the default" test "$(value prefill-chunk "$work/d.toml")" = 5

"$server" --supernet /x --prefill-attention fp32 --print-config > "$work/p.toml"
check "prefill attention can be asked to stay fp32" \
  test "$(value prefill-attention "$work/p.toml")" = '"fp32"'
"$server" --supernet /x --prefill-attention bf17 --print-config > "$work/out" 2>&1
check "a prefill attention that does not exist is exit 2, named" \
  test $? = 2 -a -n "$(grep -i 'prefill-attention' "$work/out")"

printf 'supernet = "/y"\nbogus = 1\n' > "$work/e.toml"
"$server" --config "$work/e.toml" --print-config > "$work/out" 2>&1
check "an unknown key is exit 2" test $? = 2
check "... naming it" grep -q bogus "$work/out"
"$server" --supernet /x --weights-dtype q9 --print-config > "$work/out" 2>&1
check "a bad value is exit 2" test $? = 2
check "... naming the option" grep -q weights-dtype "$work/out"
"$server" --supernet /x --tls-cert a.pem --print-config > "$work/out" 2>&1
check "a TLS cert without a key is exit 2" test $? = 2

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
