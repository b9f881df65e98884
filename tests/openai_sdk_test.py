#!/usr/bin/python3
"""The official OpenAI SDK for Node (npm `openai`, installed by scripts/setup) against a real
amoeba-server: tests/openai_sdk/sdk_check.mjs drives every everyday request kind through it.
Usage: openai_sdk_test.py AMOEBA_ADMIN AMOEBA_SERVER NODE_DIR"""
import http.client
import json
import os
import subprocess
import sys
import tempfile

from server_process import make_supernet, start_server, stop_server

admin, server_bin, node_dir = sys.argv[1:4]
here = os.path.dirname(os.path.abspath(__file__))
TOKEN = "sdk-test-token"
if not os.path.isdir(os.path.join(node_dir, "node_modules", "openai")):
    sys.exit(f"FAIL: the openai npm package is not installed in {node_dir} (scripts/setup installs it)")

with tempfile.TemporaryDirectory() as d:
    supernet = make_supernet(admin, d, seed=5)
    proc, ports = start_server(server_bin, supernet, d, "--http-port", "0", "--auth-token", TOKEN,
                               "--auth-all", "--profile", "0")
    try:
        port = int(ports[2])
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/v1/models", headers={"Authorization": f"Bearer {TOKEN}"})
        model = json.loads(c.getresponse().read())["data"][0]["id"]
        r = subprocess.run(["node", os.path.join(here, "openai_sdk", "sdk_check.mjs"), node_dir,
                            f"http://127.0.0.1:{port}/v1", TOKEN, model],
                           capture_output=True, text=True, timeout=240)
        print(r.stdout, end="")
        if r.returncode != 0:
            print(r.stderr[-3000:], file=sys.stderr)
            print(open(f"{d}/server.log").read()[-3000:], file=sys.stderr)
    finally:
        stop_server(proc)
    sys.exit(r.returncode)
