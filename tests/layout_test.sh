#!/usr/bin/env bash
# The server's layout, checked on the build: the front ends compile against no ATen/libtorch
# header, and the serving core against no protocol library (gRPC, protobuf, cpp-httplib). Reads
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
# The core's link interface names no protocol library either.
if [ ! -s amoeba_serving_links.txt ]; then
  echo "FAIL: amoeba_serving_links.txt missing"
  fail=1
elif grep -iE 'grpc|httplib|protobuf' amoeba_serving_links.txt; then
  echo "FAIL: amoeba_serving links a protocol library"
  fail=1
fi
[ "$fail" = 0 ] && echo "1 passed, 0 failed" || { echo "0 passed, 1 failed"; exit 1; }
