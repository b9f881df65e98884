#!/bin/bash
# Runs inside the server image (deploy/smoke-test.Containerfile): a tiny supernet made by the
# image's own amoeba-admin, the server started on it, health answered on gRPC and on HTTP.
set -euo pipefail
d=$(mktemp -d)
cd "$d"
amoeba-admin init --out model --preset tiny
head -c 20000 /dev/urandom | base64 > calib.txt
amoeba-admin calibrate --model model --data calib.txt --out supernet --windows 8 --window-len 32 \
  --dp-windows 2
amoeba-server --supernet supernet --port 0 --http-port 0 --metrics-port -1 --profile false \
  --port-file ports > server.log 2>&1 &
pid=$!
for _ in $(seq 300); do [ -s ports ] && break; sleep 0.2; done
read -r grpc _ http < ports
amoeba-cli --target "127.0.0.1:$grpc" --timeout 5 health
exec 3<>"/dev/tcp/127.0.0.1/$http"
printf 'GET /health HTTP/1.0\r\n\r\n' >&3
reply=$(cat <&3)
grep -q '"SERVING"' <<< "$reply" || { echo "HTTP health: $reply"; exit 1; }
kill -TERM "$pid"
wait "$pid"
tail -2 server.log
echo "smoke test passed: gRPC :$grpc and HTTP :$http answer health; SIGTERM exits 0"
