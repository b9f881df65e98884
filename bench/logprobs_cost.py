#!/usr/bin/python3
"""bench/logprobs_cost: what asking for log-probabilities costs a decode, through the server.

  bench/logprobs_cost.py --supernet DIR [--weights-dtype q8_0] [--tokens 64] [--rounds 5]

Starts amoeba-server on the supernet, then interleaves greedy generations of the full shape at
batch 1 without log-probabilities, with `logprobs` 0 and with 20 alternatives (the most gRPC
allows), reading the server's own decode tokens/s (Timings.decode_tokens_per_s) from each. Writes
bench/results/logprobs_cost.{json,md}: medians and the ratio to the plain decode.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(root, "tests"))
from server_process import start_server, stop_server  # noqa: E402


def machine():
    """The CPU's model name and family, for the report."""
    info = open("/proc/cpuinfo").read().splitlines()
    cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), "?")
    fam = next((l.split(":", 1)[1].strip() for l in info if l.startswith("cpu family")), "?")
    return cpu, fam


def write_report(out_path, data, md):
    """`out_path`.json (the figures) and .md (the table), and the table on stdout."""
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path + ".json", "w") as f:
        json.dump(data, f, indent=2)
    with open(out_path + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


def parse_args(name):
    """The options these server benches share; also puts the generated gRPC code on the path."""
    p = argparse.ArgumentParser()
    p.add_argument("--build", default=os.path.join(root, "build"))
    p.add_argument("--supernet", required=True)
    p.add_argument("--weights-dtype", default="q8_0")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(root, "bench/results", name))
    a = p.parse_args()
    sys.path.insert(0, os.path.join(a.build, "proto/python"))
    return a


def main():
    a = parse_args("logprobs_cost")
    import grpc  # noqa: E402 (Debian's python3-grpcio)
    from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as pbg  # noqa: E402

    modes = {"plain": None, "logprobs 0": 0, "logprobs 20": 20}
    rates = {m: [] for m in modes}
    with tempfile.TemporaryDirectory() as d:
        proc, ports = start_server(os.path.join(a.build, "server/amoeba-server"), a.supernet, d,
                                   "--weights-dtype", a.weights_dtype, "--profile", "0",
                                   "--speculate", "off", "--prompt-cache-mb", "0")
        try:
            stub = pbg.AmoebaStub(grpc.insecure_channel(f"127.0.0.1:{ports[0]}"))

            def run(lp):
                req = pb.GenerateRequest(text="Once upon a time", max_new_tokens=a.tokens)
                if lp is not None:
                    req.logprobs = lp
                last = None
                for m in stub.Generate(req, timeout=300):
                    last = m
                return last.timings.decode_tokens_per_s

            run(None)  # warm-up: the lane and the panels
            for _ in range(a.rounds):
                for m, lp in modes.items():
                    rates[m].append(run(lp))
        finally:
            stop_server(proc)
    cpu, fam = machine()
    med = {m: statistics.median(v) for m, v in rates.items()}
    out = {"machine": {"cpu": cpu, "family": fam, "cores": os.cpu_count()},
           "date": time.strftime("%Y-%m-%d"), "supernet": a.supernet, "weights_dtype": a.weights_dtype,
           "tokens": a.tokens, "rounds": a.rounds, "decode_tokens_per_s": rates, "median": med}
    md = [f"# bench/logprobs_cost ({a.weights_dtype}, {a.tokens} greedy tokens at batch 1, "
          f"{a.rounds} interleaved rounds; {cpu}, family {fam}, {os.cpu_count()} cores)", "",
          "| request | decode tok/s (median) | min | max | vs plain |", "|---|---|---|---|---|"]
    for m, v in rates.items():
        md.append(f"| {m} | {med[m]:.1f} | {min(v):.1f} | {max(v):.1f} | {med[m] / med['plain']:.3f}x |")
    write_report(a.out, out, md)


if __name__ == "__main__":
    main()
