#!/usr/bin/python3
"""Adversarial requests against a real amoeba-server, bounded in count and time.

Usage: fuzz_test.py ADMIN SERVER PYTHON_STUBS_DIR [REQUESTS]

Builds a tiny supernet, starts the server on a loopback port and sends REQUESTS (default 2400)
random requests over every RPC from 8 threads: out-of-range, NaN, infinite and huge fields, token
ids whose bytes are invalid UTF-8, oversized ids and texts, raw bytes that are no valid message,
random cancels and short deadlines. Asserts: no UNKNOWN status and no unexpected exception, the
server never dies, health is SERVING throughout, the log stays bounded, the same greedy text
before and after, and a clean exit on SIGTERM. Also: a corrupt supernet makes the server exit 2.
"""
import concurrent.futures
import math
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

admin, server_bin, stubs = sys.argv[1:4]
total = int(sys.argv[4]) if len(sys.argv) > 4 else 2400
sys.path.insert(0, stubs)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_process import make_supernet, start_server, stop_server  # noqa: E402
import grpc  # noqa: E402  (Debian's python3-grpcio)
from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as rpc  # noqa: E402

TOKEN = "fuzz-token"
BAD_FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e30, -1e-30, 3.4e38]
BAD_INTS = [0, -1, 1, 2**31 - 1, -2**31, 7, 1000]
BAD_INT64 = [0, -1, 2**63 - 1, -2**63, 10**13, 1]


def pick(rng, values):
    return values[rng.randrange(len(values))]


def rand_text(rng):
    kind = rng.randrange(6)
    if kind == 0:
        return ""
    if kind == 1:
        return "x" * rng.choice([40000, 100000])  # over the byte limit
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(rng.randrange(1, 20)))
    if kind == 3:
        return "\x00\n\r\t" * rng.randrange(1, 5)
    return "Hello there " * rng.randrange(1, 4)


def rand_id(rng):
    return pick(rng, ["", "ok-1", "a" * 129, "/.." * 12 + "/tmp\x00", "../../x", "/abs/path",
                      "x" * 10000, "é", "id with spaces", "line\nbreak", "v:1.2_3-4"])


def rand_shape(rng):
    s = pb.Shape()
    if rng.random() < 0.7:
        s.depth = pick(rng, [0, 3, 4, 5, 6, -1, 2**31 - 1])
    if rng.random() < 0.7:
        s.width = pick(rng, [0.0, 1.0, 0.875, 0.75, 0.625, 0.5, float("nan"), float("inf"), -1.0])
    return s


def rand_budget(rng):
    b = pb.Budget()
    for field, values in [("max_params", BAD_INT64), ("max_memory_bytes", BAD_INT64),
                          ("max_decode_ms_per_token", BAD_FLOATS), ("max_prefill_ms", BAD_FLOATS),
                          ("prompt_tokens", BAD_INTS), ("max_context_tokens", BAD_INTS)]:
        if rng.random() < 0.4:
            setattr(b, field, pick(rng, values))
    if rng.random() < 0.3:
        b.platform.memory_bandwidth_gbs = pick(rng, BAD_FLOATS + [10.0])
        b.platform.compute_gflops = pick(rng, BAD_FLOATS + [100.0])
        b.platform.memory_bytes = pick(rng, BAD_INT64)
    return b


def rand_generate(rng, vocab):
    """A valid request with zero to two fields made adversarial: most requests reach the engine."""
    r = pb.GenerateRequest(text="Hello there", max_new_tokens=rng.randrange(1, 17))
    if rng.random() < 0.5:
        r.shape.CopyFrom(pb.Shape(depth=rng.choice([3, 4, 5]), width=rng.choice([1.0, 0.875, 0.75, 0.625])))
    if rng.random() < 0.3:
        r.sampling.temperature = rng.choice([0.0, 0.7, 1.5])
        r.sampling.top_p = rng.choice([1.0, 0.9, 0.1])
        r.sampling.top_k = rng.choice([0, 1, 5])
        r.sampling.seed = rng.randrange(2**64)
    mutations = [
        lambda: setattr(r, "request_id", rand_id(rng)),
        lambda: setattr(r, "text", rand_text(rng)),
        # Byte tokens 128..255 alone are invalid UTF-8; out-of-range ids too.
        lambda: r.tokens.ids.extend(rng.choice([rng.randrange(3, vocab), 128 + rng.randrange(128),
                                                128 + rng.randrange(128), -1, vocab, 2**31 - 1])
                                    for _ in range(pick(rng, [1, 5, 50, 3000]))),
        lambda: r.shape.CopyFrom(rand_shape(rng)),
        lambda: r.budget.CopyFrom(rand_budget(rng)),
        lambda: setattr(r.sampling, "temperature", pick(rng, BAD_FLOATS)),
        lambda: setattr(r.sampling, "top_p", pick(rng, BAD_FLOATS)),
        lambda: setattr(r.sampling, "repetition_penalty", pick(rng, BAD_FLOATS + [1.1])),
        lambda: setattr(r.sampling, "top_k", pick(rng, BAD_INTS + [10**6])),
        lambda: setattr(r, "max_new_tokens", pick(rng, [0, -1, 64, 10**6, 2**31 - 1])),
        lambda: r.stop.extend(pick(rng, ["", " ", "e", "x" * 300, "\u00e9", "s"])
                              for _ in range(rng.randrange(1, 20))),
        lambda: setattr(r, "time_limit_ms", pick(rng, BAD_INT64 + [5, 50])),
        lambda: setattr(r, "add_bos", rng.random() < 0.5),
    ]
    for _ in range(rng.choice([0, 1, 1, 2])):
        pick(rng, mutations)()
    return r


class Fuzzer:
    def __init__(self, port, vocab):
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_send_message_length", 8 << 20)])
        self.stub = rpc.AmoebaStub(self.channel)
        self.raw = {m: self.channel.unary_unary(f"/amoeba.v1.Amoeba/{m}",
                                                request_serializer=lambda x: x,
                                                response_deserializer=lambda x: x)
                    for m in ["Plan", "Tokenize", "GetModelInfo", "ListShapes"]}
        self.raw_stream = self.channel.unary_stream("/amoeba.v1.Amoeba/Generate",
                                                    request_serializer=lambda x: x,
                                                    response_deserializer=lambda x: x)
        self.health = self.channel.unary_unary("/grpc.health.v1.Health/Check",
                                               request_serializer=lambda x: x,
                                               response_deserializer=lambda x: x)
        self.vocab = vocab
        self.codes = {}
        self.lock = threading.Lock()
        self.failures = []

    def note(self, what, code):
        with self.lock:
            self.codes[(what, code)] = self.codes.get((what, code), 0) + 1
            if code == grpc.StatusCode.UNKNOWN:
                self.failures.append(f"{what}: UNKNOWN")

    def one(self, seed):
        rng = random.Random(seed)
        what = pick(rng, ["generate"] * 5 + ["plan", "tokenize", "info", "shapes", "export",
                                             "raw", "cancel"])
        timeout = pick(rng, [0.001, 0.01, 0.1, 5.0, 30.0])
        md = [("authorization", "Bearer " + pick(rng, [TOKEN, "wrong"]))] if rng.random() < 0.5 else None
        try:
            if what == "generate":
                for _ in self.stub.Generate(rand_generate(rng, self.vocab), timeout=timeout, metadata=md):
                    pass
            elif what == "cancel":
                call = self.stub.Generate(rand_generate(rng, self.vocab), timeout=timeout)
                for i, _ in enumerate(call):
                    if i >= rng.randrange(3):
                        call.cancel()
                        break
            elif what == "plan":
                self.stub.Plan(pb.PlanRequest(request_id=rand_id(rng), budget=rand_budget(rng)),
                               timeout=timeout)
            elif what == "tokenize":
                self.stub.Tokenize(pb.TokenizeRequest(text=rand_text(rng), add_bos=rng.random() < 0.5),
                                   timeout=timeout)
            elif what == "info":
                self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout)
            elif what == "shapes":
                self.stub.ListShapes(pb.ListShapesRequest(), timeout=timeout)
            elif what == "export":
                call = self.stub.ExportSubnet(pb.ExportSubnetRequest(
                    request_id=rand_id(rng), shape=rand_shape(rng), uniform_width=rng.random() < 0.3,
                    no_adapters=rng.random() < 0.3), timeout=timeout, metadata=md)
                for i, _ in enumerate(call):
                    if rng.random() < 0.3:
                        call.cancel()
                        break
            elif what == "raw":  # bytes that are no valid message of the method's type
                junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
                if rng.random() < 0.5:
                    self.raw[pick(rng, list(self.raw))](junk, timeout=timeout)
                else:
                    for _ in self.raw_stream(junk, timeout=timeout):
                        pass
            self.note(what, grpc.StatusCode.OK)
        except grpc.RpcError as e:
            self.note(what, e.code())
        except Exception as e:  # noqa: BLE001 -- anything else is a bug in the server's answers
            with self.lock:
                self.failures.append(f"{what}: {type(e).__name__}: {e}"[:300])

    def serving(self):
        try:
            return self.health(b"", timeout=10) == b"\x08\x01"
        except grpc.RpcError:
            return False

    def greedy(self):
        chunks = list(self.stub.Generate(pb.GenerateRequest(request_id="fuzz-greedy", text="The quick brown fox",
                                                            shape=pb.Shape(depth=4, width=0.75),
                                                            max_new_tokens=16), timeout=60))
        return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids]


with tempfile.TemporaryDirectory() as d:
    make_supernet(admin, d, seed=3)
    passed = 0

    # A corrupt supernet is exit code 2 with a message, not an abort.
    os.makedirs(f"{d}/bad")
    for name in os.listdir(f"{d}/s"):
        os.link(f"{d}/s/{name}", f"{d}/bad/{name}")
    os.remove(f"{d}/bad/amoeba.json")
    with open(f"{d}/s/amoeba.json") as f:
        text = f.read()
    with open(f"{d}/bad/amoeba.json", "w") as f:
        f.write(text.replace('"kv_groups": [', '"kv_groups": [-1, ', 1))
    bad = subprocess.run([server_bin, "--supernet", f"{d}/bad", "--port", "0", "--metrics-port", "-1"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    assert bad.returncode == 2 and b"kv_groups" in bad.stderr, (bad.returncode, bad.stderr[-500:])
    passed += 1

    log_path = f"{d}/server.log"
    log = open(log_path, "wb")
    proc, ports = start_server(server_bin, f"{d}/s", d, "--max-context", "128",
                               "--max-prompt-tokens", "100", "--max-new-tokens", "64",
                               "--auth-token", TOKEN, "--export-dir", d, "--drain-seconds", "5",
                               stderr=log)
    try:
        port = ports[0]
        fz = Fuzzer(port, vocab=0)
        info = fz.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        fz.vocab = info.vocab_size
        before = fz.greedy()
        assert before[1], "no tokens"
        assert fz.serving()
        started = time.monotonic()
        health_ok = True
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            for chunk in range(0, total, 200):
                list(pool.map(fz.one, range(chunk, min(total, chunk + 200))))
                health_ok &= fz.serving()
                if proc.poll() is not None:
                    sys.exit(f"FAIL: server died (exit {proc.returncode}) after {chunk} requests")
        elapsed = time.monotonic() - started
        after = fz.greedy()
        log.flush()
        log_bytes = os.path.getsize(log_path)
        counts = {}
        for (what, code), n in fz.codes.items():
            counts.setdefault(what, {})[code.name] = n
        for what in sorted(counts):
            print(f"fuzz: {what}: {counts[what]}")
        print(f"fuzz: {total} requests in {elapsed:.1f} s, server log {log_bytes} bytes")
        if fz.failures:
            sys.exit("FAIL: " + "\n".join(fz.failures[:20]))
        assert sum(fz.codes.values()) == total
        assert not any(code == grpc.StatusCode.UNKNOWN for (_, code) in fz.codes), fz.codes
        passed += 1
        assert health_ok, "health was not SERVING throughout"
        passed += 1
        assert after == before, f"greedy text changed: {before} -> {after}"
        passed += 1
        assert elapsed < 60, f"{total} requests took {elapsed:.0f} s"
        passed += 1
        # Oversized ids and texts are not logged whole (10 KB ids and 100 KB texts were sent).
        assert log_bytes < 4 << 20, f"server log grew to {log_bytes} bytes"
        passed += 1
        for _ in range(100):  # cancelled exports clean up as their calls end
            leftovers = [n for n in os.listdir(d) if n.startswith("amoeba-export-")]
            if not leftovers:
                break
            time.sleep(0.1)
        assert not leftovers, f"staging directories left: {leftovers}"
        passed += 1
    finally:
        stop_server(proc)
    passed += 1
    print(f"fuzz: {passed} passed, 0 failed")
