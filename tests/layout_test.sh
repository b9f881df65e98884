#!/usr/bin/env bash
# The layout, checked on the build: the server's front ends compile against no ATen/libtorch
# header, the serving core against no protocol library (gRPC, protobuf, cpp-httplib), and no
# folder includes another folder's private (src/) headers. Reads
# the header dependencies ninja recorded for each object of the three libraries.
# Usage: layout_test.sh BUILD_DIR
set -euo pipefail
build=$1
cd "$build"
fail=0
check() {  # target-dir pattern why
  local objs
  objs=$(find "$1" -name '*.o' | sort)
  if [ -z "$objs" ]; then
    echo "FAIL: no objects under $1"
    fail=1
    return
  fi
  for o in $objs; do
    local bad
    bad=$(ninja -t deps "$o" | grep -E "$2" | head -3 || true)
    if [ -n "$bad" ]; then
      echo "FAIL: $o includes $3:"
      echo "$bad"
      fail=1
    fi
  done
  echo "checked $(echo "$objs" | wc -l) objects of $1 for $3"
}
check server/grpc/CMakeFiles/amoeba_grpc_frontend.dir '/(ATen|c10|torch)/' 'ATen/libtorch'
check server/http/CMakeFiles/amoeba_http_frontend.dir '/(ATen|c10|torch)/' 'ATen/libtorch'
check server/core/CMakeFiles/amoeba_serving.dir '/(grpcpp|grpc|google/protobuf)/|httplib\.h' 'a protocol library'
# Private headers stay private: an object outside a folder includes none of its src/ headers
# (tests, which unit-test a few of them, excepted; the shared precompiled header too).
private_checked=0
for o in $(find . -name '*.o' -not -path './tests/*' | sort); do
  owner=${o#./}
  owner=${owner%%/CMakeFiles/*}
  bad=$(ninja -t deps "$o" 2>/dev/null | grep -oE '(model|subnet|lora|distill|server/core|server/grpc|server/http)/src/[a-z_0-9]+\.h' \
        | grep -v '/pch\.h$' | grep -v "^$owner/src/" | sort -u | head -3 || true)
  if [ -n "$bad" ]; then
    echo "FAIL: $o ($owner) includes another folder's private header:"
    echo "$bad"
    fail=1
  fi
  private_checked=$((private_checked + 1))
done
echo "checked $private_checked objects for private headers of other folders"
# (~100 objects; ~45 in a unity build, where one object holds a batch of a target's files.)
[ "$private_checked" -gt 40 ] || { echo "FAIL: too few objects checked"; fail=1; }
# The core's link interface names no protocol library either.
if [ ! -s amoeba_serving_links.txt ]; then
  echo "FAIL: amoeba_serving_links.txt missing"
  fail=1
elif grep -iE 'grpc|httplib|protobuf' amoeba_serving_links.txt; then
  echo "FAIL: amoeba_serving links a protocol library"
  fail=1
fi
[ "$fail" = 0 ] && echo "1 passed, 0 failed" || { echo "0 passed, 1 failed"; exit 1; }
