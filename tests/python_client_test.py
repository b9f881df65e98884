#!/usr/bin/python3
"""A Python client that knows only amoeba.proto talks to a real amoeba-server.

Usage: python_client_test.py ADMIN SERVER PYTHON_STUBS_DIR [AMOEBA_CLI]
Builds a tiny supernet with amoeba-admin, starts the server on a free loopback port, streams a
generation, plans a budget, lists shapes and checks that a bad request is INVALID_ARGUMENT; with
AMOEBA_CLI, also that amoeba-cli's sampling flags reach the server.
"""
import json
import os
import subprocess
import sys
import tempfile

admin, server_bin, stubs = sys.argv[1:4]
cli = sys.argv[4] if len(sys.argv) > 4 else None
sys.path.insert(0, stubs)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_process import make_supernet, start_server, stop_server  # noqa: E402
import grpc  # noqa: E402  (Debian's python3-grpcio)
from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as rpc  # noqa: E402


with tempfile.TemporaryDirectory() as d:
    supernet = make_supernet(admin, d, seed=2)
    proc, ports = start_server(server_bin, supernet, d)
    try:
        port = ports[0]
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

        # Budget -> GGUF file: the full shape in f16 when memory is plenty; one byte less and the
        # planner moves to a smaller file (another dtype or shape).
        big = stub.Plan(pb.PlanRequest(budget=pb.Budget(max_memory_bytes=10**10), for_export=True),
                        timeout=10)
        assert big.export_dtype == "f16" and big.export_file_bytes > 0, big
        assert big.chosen.shape.depth == 5 and abs(big.chosen.shape.width - 1) < 1e-9, big
        tight = stub.Plan(pb.PlanRequest(budget=pb.Budget(max_memory_bytes=big.chosen.memory_bytes - 1),
                                         for_export=True), timeout=10)
        assert tight.export_file_bytes < big.export_file_bytes, (big, tight)
        assert tight.export_dtype in ("q8_0", "q4_0") or tight.chosen.params < big.chosen.params, tight
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

        if cli:
            # amoeba-cli's sampling flags: a logit bias moves greedy onto one token; bad values
            # are a clear error (exit 2 for a malformed flag, the server's INVALID_ARGUMENT else).
            base = [cli, "--target", f"127.0.0.1:{port}"]
            ids = list(stub.Tokenize(pb.TokenizeRequest(text="the", add_bos=False), timeout=10).ids)
            out = subprocess.run(base + ["--json", "generate", "Hello", "-n", "4", "--logit-bias",
                                         f"{ids[-1]}=100", "--presence-penalty", "0.1",
                                         "--frequency-penalty", "0.1", "--min-p", "0.05"],
                                 capture_output=True, text=True, timeout=60)
            got = [t for line in out.stdout.splitlines() if line.startswith("{")
                   for t in json.loads(line).get("tokenIds", [])]
            assert out.returncode == 0 and got == [ids[-1]] * 4, (out.returncode, got, out.stderr[-300:])
            # --logprobs: one line per new token after the text (its id, value, alternatives);
            # with --json the messages carry them.
            out = subprocess.run(base + ["generate", "Hello", "-n", "3", "--logprobs", "2"],
                                 capture_output=True, text=True, timeout=60)
            lines = [l for l in out.stderr.splitlines() if l.startswith("[logprob ")]
            assert out.returncode == 0 and len(lines) == 3 and all(l.count(":") == 3 for l in lines), \
                (out.returncode, out.stderr[-500:])
            out = subprocess.run(base + ["--json", "generate", "Hello", "-n", "3", "--logprobs", "1"],
                                 capture_output=True, text=True, timeout=60)
            lps = [x for line in out.stdout.splitlines() if line.startswith("{")
                   for x in json.loads(line).get("logprobs", [])]
            assert len(lps) == 3 and all(x["logprob"] <= 0 and len(x["top"]) == 1 for x in lps), out.stdout[-500:]
            bad = subprocess.run(base + ["generate", "x", "--logit-bias", "x=1"], capture_output=True,
                                 text=True, timeout=60)
            assert bad.returncode == 2 and "--logit-bias" in bad.stderr, (bad.returncode, bad.stderr)
            far = subprocess.run(base + ["generate", "x", "--presence-penalty", "5"], capture_output=True,
                                 text=True, timeout=60)
            assert far.returncode != 0 and "sampling.presence_penalty" in far.stderr, (far.returncode, far.stderr)
            passed += 1
        print(f"python_client: {passed} passed, 0 failed")
    finally:
        stop_server(proc, timeout=20)
