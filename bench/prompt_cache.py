#!/usr/bin/python3
"""bench/prompt_cache: multi-turn chat against amoeba-server with and without the prompt cache.

  bench/prompt_cache.py [--build build] [--preset 100m] [--weights-dtype q8_0] [--clients 8]
                        [--turns 6] [--system-tokens 500] [--user-tokens 30]
                        [--question-tokens 10] [--reply-tokens 32]

Builds a supernet from a preset (random weights, as bench/serve does), then for each mode
(--prompt-cache-mb 0, then the default cap) starts amoeba-server and runs over its OpenAI HTTP API:
  1. Conversations: `clients` clients at once, each its own chat under one shared system prompt,
     `turns` turns, every turn the whole conversation again (as chat clients send it), greedy
     replies of `reply-tokens` tokens, streamed. Per turn: median time to first token, prompt tokens,
     cached tokens.
  2. Fan-out: one client alone, then `clients` clients at once, each with a new system prompt of
     the same length and a short question of its own; the prompt tokens the server computed
     (amoeba_prefill_tokens_total) for the many against the one.
Writes bench/results/prompt_cache.{json,md}. Loopback only; the load generator is this process
(threads waiting on sockets), so absolute times include its share of the cores.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(root, "tests"))
from server_process import run, start_server, stop_server  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
         "matches near old river banks and tall green hills under bright morning skies").split()


def words(n, seed):
    return " ".join(WORDS[(seed * 7 + i * 3 + (i * i) % 5) % len(WORDS)] for i in range(n))


def count_tokens(port, content):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("POST", "/tokenize", json.dumps({"content": content, "add_special": False}),
              {"Content-Type": "application/json"})
    n = len(json.loads(c.getresponse().read())["tokens"])
    c.close()
    return n


WORDS_PER_TOKEN = []  # measured once per server: how many words make a token (the tokenizer's)


def text(tokens, seed):
    """About `tokens` tokens of text."""
    return words(max(1, round(tokens * WORDS_PER_TOKEN[0])), seed)


def machine():
    info = {"cores": os.cpu_count()}
    for line in open("/proc/cpuinfo"):
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k in ("model name", "cpu family", "model") and k not in info:
            info[k] = v
        if k == "flags" and "flags" not in info:
            have = set(v.split())
            info["flags"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                             if f in have]
    return info


MODEL = []  # the served model's name, from /v1/models


def model_name(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/v1/models")
    name = json.loads(c.getresponse().read())["data"][0]["id"]
    c.close()
    return name


def chat(port, messages, max_tokens):
    """One streamed greedy chat completion: (ttft_s, reply text, usage, server_ttft_s). The
    client's TTFT is to the first text it receives; the server's (amoeba.timings) to the first
    token sampled, which is what the prompt cache changes (a random-weight model's first tokens are
    often bytes of an unfinished UTF-8 character, whose text is held back)."""
    body = json.dumps({"model": MODEL[0], "messages": messages, "max_tokens": max_tokens,
                       "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.monotonic()
    c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise RuntimeError(f"HTTP {r.status}: {r.read()[:300]!r}")
    ttft, reply, usage, server_ttft = None, [], None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        ev = json.loads(line[6:])
        if ev.get("usage"):
            usage = ev["usage"]
        if "timings" in ev.get("amoeba", {}):
            server_ttft = ev["amoeba"]["timings"]["time_to_first_token_ms"] / 1e3
        for ch in ev.get("choices", []):
            piece = ch.get("delta", {}).get("content")
            if piece:
                if ttft is None:
                    ttft = time.monotonic() - t0
                reply.append(piece)
    c.close()
    if ttft is None:  # nothing but the end: the first token was the end of the reply
        ttft = time.monotonic() - t0
    return ttft, "".join(reply), usage, server_ttft


def prefilled(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request("GET", "/metrics")
    body = c.getresponse().read().decode()
    c.close()
    m = re.search(r"^amoeba_prefill_tokens_total (\S+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


def settled_prefilled(port):
    time.sleep(1.2)  # the gauges are published every 0.5 s
    return prefilled(port)


def conversations(port, a):
    system = text(a.system_tokens, 1)
    turns = [[] for _ in range(a.turns)]
    errors = []

    def client(i):
        messages = [{"role": "system", "content": system}]
        try:
            for t in range(a.turns):
                messages.append({"role": "user", "content": text(a.user_tokens, 100 + 10 * i + t)})
                ttft, reply, usage, server_ttft = chat(port, messages, a.reply_tokens)
                messages.append({"role": "assistant", "content": reply})
                turns[t].append({"ttft_s": server_ttft, "client_ttft_s": ttft,
                                 "prompt_tokens": usage["prompt_tokens"],
                                 "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]})
        except Exception as e:  # noqa: BLE001 (reported, the run goes on)
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        sys.exit(f"conversation errors: {errors[:3]}")
    return [{"turn": t + 1,
             "ttft_median_s": statistics.median(x["ttft_s"] for x in turns[t]),
             "client_ttft_median_s": statistics.median(x["client_ttft_s"] for x in turns[t]),
             "prompt_tokens_median": statistics.median(x["prompt_tokens"] for x in turns[t]),
             "cached_tokens_median": statistics.median(x["cached_tokens"] for x in turns[t])}
            for t in range(a.turns)]


def fan_out(port, a, seed, clients):
    """`clients` clients at once on a new shared system prompt: prompt tokens computed."""
    system = text(a.system_tokens, seed)
    before = settled_prefilled(port)
    threads = [threading.Thread(target=chat, args=(port, [
        {"role": "system", "content": system},
        {"role": "user", "content": text(a.question_tokens, seed * 31 + i)}], 4)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return settled_prefilled(port) - before


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--build", default=os.path.join(root, "build"))
    p.add_argument("--preset", default="100m")
    p.add_argument("--weights-dtype", default="q8_0")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--user-tokens", type=int, default=30, help="per turn of a conversation")
    p.add_argument("--question-tokens", type=int, default=10, help="per client of the fan-out")
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--supernet", help="an existing supernet directory (default: made from --preset)")
    p.add_argument("--modes", default="off,on", help="prompt cache off, on, or both")
    p.add_argument("--logs", help="keep the servers' logs in this directory")
    p.add_argument("--out", default=os.path.join(root, "bench/results/prompt_cache"))
    a = p.parse_args()
    admin = os.path.join(a.build, "admin/amoeba-admin")
    server = os.path.join(a.build, "server/amoeba-server")
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "preset": a.preset,
              "weights_dtype": a.weights_dtype, "clients": a.clients, "turns": a.turns,
              "system_tokens": a.system_tokens, "user_tokens": a.user_tokens,
              "question_tokens": a.question_tokens, "reply_tokens": a.reply_tokens, "modes": {}}
    with tempfile.TemporaryDirectory() as d:
        supernet = a.supernet
        if not supernet:
            run(admin, "init", "--out", f"{d}/m", "--preset", a.preset, "--seed", "1")
            with open(f"{d}/calib.txt", "w") as f:
                f.write(" ".join(["the quick brown fox jumps over the lazy dog"] * 400))
            run(admin, "calibrate", "--model", f"{d}/m", "--data", f"{d}/calib.txt", "--out",
                f"{d}/s", "--windows", "4", "--window-len", "64", "--dp-windows", "2")
            supernet = f"{d}/s"
        for mode in a.modes.split(","):
            extra = ["--prompt-cache-mb", "0"] if mode == "off" else []
            logs = a.logs or d
            os.makedirs(logs, exist_ok=True)
            log = open(os.path.join(logs, f"server-{mode}.log"), "w")
            proc, ports = start_server(server, supernet, d, "--http-port", "0", "--weights-dtype",
                                       a.weights_dtype, "--max-context", "4096", "--profile", "0",
                                       *extra, stderr=log)
            try:
                port = int(ports[2])
                MODEL[:] = [model_name(port)]
                WORDS_PER_TOKEN[:] = [2000 / count_tokens(port, words(2000, 3))]
                chat(port, [{"role": "user", "content": "warm up"}], 2)
                print(f"[{mode}] conversations...", file=sys.stderr)
                t0 = time.monotonic()
                per_turn = conversations(port, a)
                seconds = time.monotonic() - t0
                print(f"[{mode}] fan-out...", file=sys.stderr)
                one = fan_out(port, a, 7, 1)
                many = fan_out(port, a, 8, a.clients)
            finally:
                stop_server(proc)
            result["modes"][mode] = {"turns": per_turn, "conversation_seconds": seconds,
                                     "fan_out_prefilled_1": one, "fan_out_prefilled_n": many}
            print(json.dumps(result["modes"][mode]), file=sys.stderr)

    if len(result["modes"]) < 2:
        print(json.dumps(result, indent=2))
        return
    on, off = result["modes"]["on"], result["modes"]["off"]
    last = a.turns - 1
    result["ttft_last_turn_on_over_off"] = (on["turns"][last]["ttft_median_s"] /
                                           off["turns"][last]["ttft_median_s"])
    result["fan_out_ratio_on"] = on["fan_out_prefilled_n"] / on["fan_out_prefilled_1"]
    result["fan_out_ratio_off"] = off["fan_out_prefilled_n"] / off["fan_out_prefilled_1"]
    m = result["machine"]
    md = [f"# bench/prompt_cache ({a.preset} preset, {a.weights_dtype}, {a.clients} clients, "
          f"{a.turns} turns, {a.system_tokens}-token shared system prompt, {a.reply_tokens}-token "
          f"greedy replies)", "",
          f"Machine: {m.get('model name')} (family {m.get('cpu family')}, model {m.get('model')}), "
          f"{m['cores']} cores, {', '.join(m.get('flags', []))}; {result['date']}.", "",
          "TTFT is the server's (amoeba.timings: arrival to first token sampled); the client's, to "
          "the first text it receives, is in the JSON (a random-weight model's first tokens are often "
          "bytes of an unfinished character, whose text is held back).", "",
          "| turn | prompt tokens (median) | cached tokens (median, cache on) | TTFT median, "
          "cache off | TTFT median, cache on | on / off |", "|---|---|---|---|---|---|"]
    for t in range(a.turns):
        x, y = off["turns"][t], on["turns"][t]
        md.append(f"| {t + 1} | {y['prompt_tokens_median']:.0f} | {y['cached_tokens_median']:.0f} "
                  f"| {x['ttft_median_s'] * 1e3:.0f} ms | {y['ttft_median_s'] * 1e3:.0f} ms | "
                  f"{y['ttft_median_s'] / x['ttft_median_s']:.2f}x |")
    md += ["", f"Whole conversation run: {off['conversation_seconds']:.1f} s without the cache, "
           f"{on['conversation_seconds']:.1f} s with it.", "",
           f"Fan-out ({a.clients} clients at once on a new {a.system_tokens}-token system prompt, "
           f"each with its own question) against one client: prompt tokens computed "
           f"{on['fan_out_prefilled_n']:.0f} vs {on['fan_out_prefilled_1']:.0f} = "
           f"**{result['fan_out_ratio_on']:.2f}x** with the cache, "
           f"{off['fan_out_prefilled_n']:.0f} vs {off['fan_out_prefilled_1']:.0f} = "
           f"{result['fan_out_ratio_off']:.2f}x without.", ""]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
