#!/usr/bin/env python3
"""Decode latency of requests that arrive after an idle spell, against the start-up profile.

Sends greedy non-streaming completions to each server's OpenAI-compatible API, one at a time with
--gap seconds between them (the server goes idle, as it does between a user's requests), and
reads the server-side decode time of each from the response's `amoeba.timings`. Servers are
visited in interleaved rounds. The start-up profile's figure for each shape comes from the
server's log ("server profile: <shape> decode X ms/token").

  idle_gap.py --server pinned=HTTP_PORT:LOG --server unpinned=HTTP_PORT:LOG \
      --shape depth=8,width=1 --json out.json --md out.md
"""
import argparse
import http.client
import json
import re
import statistics


def profile_ms(log_path, shape):
    pattern = re.compile(r"server profile: (\S+) decode ([0-9.]+) ms/token")
    with open(log_path) as f:
        for line in f:
            m = pattern.search(line)
            if m and m.group(1) == shape:
                return float(m.group(2))
    return None


def decode_ms(port, shape, prompt, tokens):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"model": shape, "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = json.loads(c.getresponse().read())
    c.close()
    if "amoeba" not in r:
        raise SystemExit(f"{shape}: {r}")
    t, n = r["amoeba"]["timings"], r["usage"]["completion_tokens"]
    if n < 2:
        raise SystemExit(f"{shape}: only {n} tokens came back: {r}")
    return (t["total_ms"] - t["time_to_first_token_ms"]) / (n - 1)


def main():
    import time
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", action="append", required=True, help="label=HTTP_PORT:LOG")
    ap.add_argument("--shape", action="append", required=True)
    ap.add_argument("--gap", type=float, default=0.2, help="idle seconds before each request")
    ap.add_argument("--requests", type=int, default=8, help="per server, shape and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", default="The secret of a happy life is")
    ap.add_argument("--machine", default="")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md", required=True)
    a = ap.parse_args()
    servers = []
    for s in a.server:
        label, rest = s.split("=", 1)
        port, log = rest.split(":", 1)
        servers.append((label, int(port), log))
    ms = {(label, shape): [] for label, _, _ in servers for shape in a.shape}
    for r in range(a.rounds):
        order = servers if r % 2 == 0 else servers[::-1]
        for label, port, _ in order:
            for shape in a.shape:
                decode_ms(port, shape, a.prompt, 8)  # not timed: wakes the shape's lane
                for _ in range(a.requests):
                    time.sleep(a.gap)
                    ms[(label, shape)].append(decode_ms(port, shape, a.prompt, a.tokens))
    rows = []
    for label, _, log in servers:
        for shape in a.shape:
            v = sorted(ms[(label, shape)])
            prof = profile_ms(log, shape)
            p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
            med = statistics.median(v)
            slow = sum(x > 1.5 * prof for x in v) if prof else None
            rows.append({"server": label, "shape": shape, "profile_ms": prof, "median_ms": med,
                         "p90_ms": p90, "max_ms": v[-1], "requests": len(v),
                         "slower_than_1_5x_profile": slow,
                         "median_over_profile": med / prof if prof else None, "ms": v})
    out = {"machine": a.machine, "gap_s": a.gap, "tokens": a.tokens, "rows": rows}
    with open(a.json, "w") as f:
        json.dump(out, f, indent=1)
    lines = [f"Machine: {a.machine}; {a.tokens} greedy tokens per request, {a.gap} s idle before "
             f"each, {a.rounds} interleaved rounds.", "",
             "| server | shape | start-up profile ms/token | requests: median | p90 | max | "
             "median / profile | requests > 1.5x profile |", "|---|---|---|---|---|---|---|---|"]
    for x in rows:
        prof = f"{x['profile_ms']:.3f}" if x["profile_ms"] else "-"
        ratio = f"{x['median_over_profile']:.2f}x" if x["median_over_profile"] else "-"
        slow = f"{x['slower_than_1_5x_profile']} of {x['requests']}" \
            if x["slower_than_1_5x_profile"] is not None else "-"
        lines.append(f"| {x['server']} | {x['shape']} | {prof} | {x['median_ms']:.3f} | "
                     f"{x['p90_ms']:.3f} | {x['max_ms']:.3f} | {ratio} | {slow} |")
    with open(a.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
