#!/usr/bin/python3
"""A Python client that knows only amoeba.proto talks to a real amoeba-server.

Usage: python_client_test.py ADMIN SERVER PYTHON_STUBS_DIR
Builds a tiny supernet with amoeba-admin, starts the server on a free loopback port, streams a
generation, plans a budget, lists shapes and checks that a bad request is INVALID_ARGUMENT.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

admin, server_bin, stubs = sys.argv[1:4]
sys.path.insert(0, stubs)
import grpc  # noqa: E402  (Debian's python3-grpcio)
from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as rpc  # noqa: E402


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


with tempfile.TemporaryDirectory() as d:
    run(admin, "init", "--out", f"{d}/m", "--preset", "tiny", "--layers", "5", "--seed", "2")
    with open(f"{d}/calib.txt", "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 100)
    run(admin, "calibrate", "--model", f"{d}/m", "--data", f"{d}/calib.txt", "--out", f"{d}/s",
        "--windows", "4", "--window-len", "32", "--dp-windows", "2")
    port_file = f"{d}/ports"
    proc = subprocess.Popen([server_bin, "--supernet", f"{d}/s", "--host", "127.0.0.1", "--port", "0",
                             "--metrics-port", "-1", "--port-file", port_file],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if os.path.exists(port_file):
                break
            if proc.poll() is not None:
                sys.exit(f"server exited: {proc.stderr.read().decode()}")
            time.sleep(0.1)
        port = open(port_file).read().split()[0]
        stub = rpc.AmoebaStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        passed = 0

        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.num_layers == 5 and list(info.depths) == [3, 4, 5], info
        passed += 1

        chunks = list(stub.Generate(pb.GenerateRequest(request_id="py-1", text="Hello",
                                                       shape=pb.Shape(depth=4, width=0.75),
                                                       max_new_tokens=8), timeout=30))
        last = chunks[-1]
        assert last.request_id == "py-1" and last.shape.depth == 4 and abs(last.shape.width - 0.75) < 1e-9
        assert last.usage.completion_tokens == sum(len(c.token_ids) for c in chunks)
        assert last.finish_reason in (pb.LENGTH, pb.EOS), last
        passed += 1

        plan = stub.Plan(pb.PlanRequest(budget=pb.Budget(max_params=info.hidden_size * 10**6)), timeout=10)
        assert plan.chosen.params > 0 and len(plan.frontier) >= 1
        passed += 1

        shapes = stub.ListShapes(pb.ListShapesRequest(), timeout=10).shapes
        assert len(shapes) == 3 * 4, len(shapes)
        passed += 1

        try:
            list(stub.Generate(pb.GenerateRequest(text="x", sampling=pb.Sampling(top_p=2.0)), timeout=10))
            sys.exit("FAIL: top_p=2 was accepted")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "sampling.top_p" in e.details(), e
        passed += 1
        print(f"python_client: {passed} passed, 0 failed")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            sys.exit("FAIL: server did not stop within 20 s of SIGTERM")
    if proc.returncode != 0:
        sys.exit(f"FAIL: server exit code {proc.returncode}")
