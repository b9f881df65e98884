#!/usr/bin/python3
"""bench/grammar_cost: what constrained decoding (a JSON schema) costs a decode, through the server.

  bench/grammar_cost.py --supernet DIR [--weights-dtype q8_0] [--tokens 64] [--rounds 5]

Starts amoeba-server on the supernet, then interleaves greedy generations of the full shape
without a constraint and under a JSON schema (an object whose one string property must be 1,000
characters long, so the constraint never ends the output first), at batch 1 (the server's own
decode tokens/s, Timings.decode_tokens_per_s) and at batch 16 (16 concurrent streams: completion
tokens over wall time). Also the time to compile a schema: the first request's time to first
token with a schema the server has not seen, minus that of a schema it has. Writes
bench/results/grammar_cost.{json,md}.
"""
import concurrent.futures
import json
import os
import statistics
import sys
import tempfile
import time

from logprobs_cost import machine, parse_args, start_server, stop_server, write_report


def schema(tag="text"):
    return json.dumps({"type": "object", "properties": {
        tag: {"type": "string", "minLength": 1000, "maxLength": 1000},
        "n": {"type": "integer"}}, "required": [tag, "n"], "additionalProperties": False})


def main():
    a = parse_args("grammar_cost")
    import grpc  # noqa: E402 (Debian's python3-grpcio)
    from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as pbg  # noqa: E402

    rates = {f"{m}, batch {b}": [] for b in (1, 16) for m in ("plain", "json schema")}
    ttft = {"new schema": [], "cached schema": []}
    with tempfile.TemporaryDirectory() as d:
        proc, ports = start_server(os.path.join(a.build, "server/amoeba-server"), a.supernet, d,
                                   "--weights-dtype", a.weights_dtype, "--profile", "0",
                                   "--speculate", "off", "--prompt-cache-mb", "0",
                                   "--max-concurrent", "16")
        try:
            stub = pbg.AmoebaStub(grpc.insecure_channel(f"127.0.0.1:{ports[0]}"))

            def run(constraint):
                req = pb.GenerateRequest(text="Once upon a time", max_new_tokens=a.tokens)
                if constraint:
                    req.json_schema = constraint
                last = None
                for m in stub.Generate(req, timeout=600):
                    last = m
                return last

            def batch(constraint):
                t0 = time.perf_counter()
                with concurrent.futures.ThreadPoolExecutor(16) as pool:
                    outs = list(pool.map(lambda _: run(constraint), range(16)))
                return sum(o.usage.completion_tokens for o in outs) / (time.perf_counter() - t0)

            run(None)  # warm-up: the lane and the panels
            run(schema())
            for r in range(a.rounds):
                for m, c in (("plain", None), ("json schema", schema())):
                    rates[f"{m}, batch 1"].append(run(c).timings.decode_tokens_per_s)
                    rates[f"{m}, batch 16"].append(batch(c))
                ttft["new schema"].append(run(schema(f"text{r}")).timings.time_to_first_token_ms)
                ttft["cached schema"].append(run(schema()).timings.time_to_first_token_ms)
        finally:
            stop_server(proc)
    med = {m: statistics.median(v) for m, v in rates.items()}
    tmed = {k: statistics.median(v) for k, v in ttft.items()}
    cpu, fam = machine()
    out = {"machine": {"cpu": cpu, "family": fam, "cores": os.cpu_count()},
           "date": time.strftime("%Y-%m-%d"), "supernet": a.supernet, "weights_dtype": a.weights_dtype,
           "tokens": a.tokens, "rounds": a.rounds, "decode_tokens_per_s": rates, "median": med,
           "time_to_first_token_ms": ttft, "schema_compile_ms": tmed["new schema"] - tmed["cached schema"]}
    md = [f"# bench/grammar_cost ({a.weights_dtype}, {a.tokens} greedy tokens, {a.rounds} interleaved "
          f"rounds; {cpu}, family {fam}, {os.cpu_count()} cores)", "",
          "| request | decode tok/s (median) | min | max | vs plain |", "|---|---|---|---|---|"]
    for m, v in rates.items():
        base = med["plain, batch 1" if m.endswith("batch 1") else "plain, batch 16"]
        md.append(f"| {m} | {med[m]:.1f} | {min(v):.1f} | {max(v):.1f} | {med[m] / base:.3f}x |")
    md += ["", f"Time to first token with a new schema {tmed['new schema']:.1f} ms, with a compiled one "
           f"{tmed['cached schema']:.1f} ms: compiling costs ~{out['schema_compile_ms']:.1f} ms."]
    write_report(a.out, out, md)


if __name__ == "__main__":
    main()
