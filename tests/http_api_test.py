#!/usr/bin/python3
"""The OpenAI-compatible HTTP API against a real amoeba-server, with Python's http.client and curl.

Usage: http_api_test.py ADMIN SERVER PYTHON_STUBS_DIR

Checks: /v1/models lists every grid shape and the aliases; /v1/completions and
/v1/chat/completions answer plain and streamed (server-sent events ending with [DONE]); greedy
text equals the gRPC Generate on the same shape; a budget picks the planner's shape; every error
status in the OpenAI error shape; the token; a client that disconnects mid-stream cancels its
request; /health and /metrics.
"""
import html
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

admin, server_bin, stubs = sys.argv[1:4]
sys.path.insert(0, stubs)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from headless_browser import Browser  # noqa: E402
from server_process import make_supernet, start_server, stop_server  # noqa: E402
import grpc  # noqa: E402
from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as rpc  # noqa: E402

TOKEN = "http-token"
checks = 0


def check(cond, what):
    global checks
    if not cond:
        sys.exit(f"FAIL: {what}")
    checks += 1


def call(port, method, path, body=None, token=TOKEN, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body) if body is not None else None)
    c.request(method, path, body=data, headers=headers)
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    return r.status, text


def events(text):
    out = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    return out


with tempfile.TemporaryDirectory() as d:
    supernet = make_supernet(admin, d, seed=4)
    proc, ports = start_server(server_bin, supernet, d, "--http-port", "0", "--auth-token", TOKEN,
                               "--auth-all", "--model-alias", "phone=depth=3,width=0.625",
                               "--max-context", "256", "--max-new-tokens", "200",
                               "--max-concurrent", "2", "--queue-size", "1", "--drain-seconds", "10")
    try:
        grpc_port, _, port = ports
        port = int(port)

        status, text = call(port, "GET", "/health", token=None)
        check(status == 200 and json.loads(text)["status"] == "SERVING", f"/health: {status} {text}")

        status, text = call(port, "GET", "/v1/models")
        ids = [m["id"] for m in json.loads(text)["data"]]
        check(status == 200 and "amoeba:depth=5,width=1" in ids and "amoeba:depth=3,width=0.625" in ids
              and {"full", "smallest", "phone"} <= set(ids) and len(ids) == 12 + 3, f"/v1/models: {ids}")
        # Each entry says what its shape is: size, estimated latency and quality, their sources.
        about = {m["id"]: m["amoeba"] for m in json.loads(text)["data"]}
        check(all(a["params"] > 0 and a["decode_ms_per_token"] > 0 and a["quality_source"] and
                  a["latency_source"] in ("measured", "roofline") for a in about.values())
              and about["full"]["params"] > about["smallest"]["params"]
              and about["phone"] == about["amoeba:depth=3,width=0.625"], f"/v1/models details: {about}")

        # Greedy completion == gRPC Generate on the same shape.
        stub = rpc.AmoebaStub(grpc.insecure_channel(f"127.0.0.1:{grpc_port}"))
        md = [("authorization", f"Bearer {TOKEN}")]
        want = "".join(c.text for c in stub.Generate(pb.GenerateRequest(
            text="Hello there", shape=pb.Shape(depth=4, width=0.75), max_new_tokens=12), metadata=md, timeout=30))
        body = {"model": "amoeba:depth=4,width=0.75", "prompt": "Hello there", "max_tokens": 12,
                "temperature": 0}
        status, text = call(port, "POST", "/v1/completions", body)
        r = json.loads(text)
        check(status == 200 and r["object"] == "text_completion", f"completion: {status} {text[:300]}")
        check(r["choices"][0]["text"] == want, f"completion text {r['choices'][0]['text']!r} != gRPC {want!r}")
        check(r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] == 12
              and r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 12, f"usage: {r}")
        check(r["amoeba"]["shape"] == {"depth": 4, "width": 0.75}, f"shape: {r['amoeba']}")

        # Streamed: the same text in deltas, a final chunk with the finish reason, then [DONE].
        status, text = call(port, "POST", "/v1/completions", dict(body, stream=True))
        ev = events(text)
        check(status == 200 and ev[-1] == "[DONE]", f"stream end: {ev[-3:]}")
        chunks = [json.loads(e) for e in ev[:-1]]
        check("".join(c["choices"][0]["text"] for c in chunks) == want, "streamed text")
        check(chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) > 2, "stream finish")
        # The same prompt ran before (gRPC, then unstreamed): all of it but its last token comes
        # from the prompt cache, and the text is still the same. The server's timings ride along.
        usage, amoeba = chunks[-1].get("usage", {}), chunks[-1].get("amoeba", {})
        check(usage.get("prompt_tokens_details", {}).get("cached_tokens") == r["usage"]["prompt_tokens"] - 1,
              f"cached prompt tokens: {usage}")
        t = amoeba.get("timings", {})
        check(0 <= t.get("queue_ms", -1) <= t.get("time_to_first_token_ms", -1) <= t.get("total_ms", -1),
              f"timings: {amoeba}")

        # Speculative decoding: a smaller shape drafts; greedy text unchanged, the draft reported.
        spec = dict(body, amoeba={"speculate": "depth=3,width=0.625", "draft_tokens": 3})
        status, text = call(port, "POST", "/v1/completions", spec)
        r = json.loads(text)
        # (AVX-512's fp32 one-row kernel rounds apart from many rows: equal up to near-ties there.)
        exact = "avx512f" not in open("/proc/cpuinfo").read()
        check(status == 200 and (r["choices"][0]["text"] == want or not exact), f"speculate text: {text[:300]}")
        sp = r["amoeba"].get("speculation", {})
        check(sp.get("draft") == {"depth": 3, "width": 0.625} and sp.get("checks", 0) > 0
              and 0 <= sp.get("accepted_tokens", -1) <= sp.get("drafted_tokens", -1), f"speculation: {r['amoeba']}")
        ev = events(call(port, "POST", "/v1/completions", dict(spec, stream=True))[1])
        last = json.loads(ev[-2])
        check("speculation" in last.get("amoeba", {}), f"streamed speculation: {ev[-2][:300]}")

        # Chat, plain and streamed (an alias picks the shape).
        chat = {"model": "phone", "messages": [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "Hi!"}],
                "max_tokens": 8, "temperature": 0.7, "seed": 3}
        status, text = call(port, "POST", "/v1/chat/completions", chat)
        r = json.loads(text)
        check(status == 200 and r["object"] == "chat.completion" and
              r["choices"][0]["message"]["role"] == "assistant" and r["usage"]["completion_tokens"] >= 1,
              f"chat: {status} {text[:300]}")
        check(r["amoeba"]["shape"] == {"depth": 3, "width": 0.625}, "alias shape")
        status, text = call(port, "POST", "/v1/chat/completions", dict(chat, stream=True))
        ev = events(text)
        chunks = [json.loads(e) for e in ev[:-1]]
        check(ev[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
              and chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length"), "chat stream")
        check("".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
              == r["choices"][0]["message"]["content"], "chat stream text == chat text (same seed)")

        # Content as an array of text parts (what SDK helpers send) is the same prompt as the
        # joined string; response_format "text", "user" and "metadata" are accepted as OpenAI's.
        greedy_chat = {"model": "phone", "max_tokens": 6, "temperature": 0,
                       "messages": [{"role": "user", "content": "Hi!\nHow are you?"}]}
        _, plain_text = call(port, "POST", "/v1/chat/completions", greedy_chat)
        parts = dict(greedy_chat, messages=[{"role": "user", "content": [
            {"type": "text", "text": "Hi!"}, {"type": "text", "text": "How are you?"}]}],
            response_format={"type": "text"}, user="u-1", metadata={"k": "v"})
        status, parts_text = call(port, "POST", "/v1/chat/completions", parts)
        check(status == 200 and json.loads(parts_text)["choices"][0]["message"]["content"]
              == json.loads(plain_text)["choices"][0]["message"]["content"],
              f"text content parts == the joined string: {status} {parts_text[:200]}")
        image = dict(greedy_chat, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
        status, text = call(port, "POST", "/v1/chat/completions", image)
        check(status == 400 and "messages[0].content[0].type" in text and "image_url" in text,
              f"an image part is a clear 400: {status} {text[:200]}")
        status, text = call(port, "POST", "/v1/chat/completions",
                            dict(greedy_chat, response_format={"type": "yaml"}))
        check(status == 400 and "response_format.type" in text, f"an unknown format is a 400: {status} {text[:200]}")

        # /tokenize and /detokenize (llama.cpp's server routes): the ids gRPC's Tokenize gives,
        # and back to the text.
        grpc_ids = list(stub.Tokenize(pb.TokenizeRequest(text="Hello there, friend"), metadata=md, timeout=10).ids)
        status, text = call(port, "POST", "/tokenize", {"content": "Hello there, friend"})
        check(status == 200 and json.loads(text)["tokens"] == grpc_ids, f"/tokenize: {status} {text[:200]} vs {grpc_ids}")
        status, text = call(port, "POST", "/tokenize", {"content": "Hello", "add_special": False, "with_pieces": True})
        toks = json.loads(text)["tokens"]
        check(status == 200 and "".join(t["piece"] for t in toks).replace("\u2581", " ").strip() == "Hello"
              and all(t["id"] != grpc_ids[0] for t in toks[:1]), f"/tokenize with pieces, no BOS: {text[:200]}")
        status, text = call(port, "POST", "/detokenize", {"tokens": grpc_ids[1:]})
        check(status == 200 and json.loads(text)["content"].strip() == "Hello there, friend",
              f"/detokenize: {status} {text[:200]}")
        for bad, needle in [({"tokens": [1, -2]}, "tokens"), ({"tokens": [10 ** 6]}, "tokens[0]"),
                            ({"tokens": "x"}, "tokens"), ({"content": 5}, "content")]:
            route = "/tokenize" if "content" in bad else "/detokenize"
            status, text = call(port, "POST", route, bad)
            check(status == 400 and needle in json.loads(text)["error"]["message"], f"{route} {bad}: {status} {text[:200]}")
        status, _ = call(port, "POST", "/tokenize", {"content": "x"}, token=None)
        check(status == 401, f"/tokenize needs the token under --auth-all: {status}")

        # logit_bias (OpenAI's {"id": bias}) moves greedy decoding onto one token, on HTTP and gRPC
        # alike; presence/frequency penalties and min_p are accepted.
        the = json.loads(call(port, "POST", "/tokenize", {"content": "the", "add_special": False})[1])["tokens"][0]
        forced = json.loads(call(port, "POST", "/detokenize", {"tokens": [the] * 5})[1])["content"]
        status, text = call(port, "POST", "/v1/completions", dict(body, max_tokens=5, logit_bias={str(the): 100},
                                                                   presence_penalty=0.1, frequency_penalty=0.1))
        check(status == 200 and json.loads(text)["choices"][0]["text"].strip() == forced.strip(),
              f"logit_bias forces token {the}: {text[:200]} vs {forced!r}")
        got = "".join(c.text for c in stub.Generate(pb.GenerateRequest(
            text="Hello there", shape=pb.Shape(depth=4, width=0.75), max_new_tokens=5,
            sampling=pb.Sampling(temperature=0, logit_bias={the: 100.0})), metadata=md, timeout=30))
        check(got.strip() == forced.strip(), f"gRPC logit_bias: {got!r} vs {forced!r}")
        status, text = call(port, "POST", "/v1/completions", dict(body, temperature=0.8, min_p=0.2, seed=1))
        check(status == 200, f"min_p accepted: {status} {text[:200]}")

        # Log-probabilities, chat: one entry per new token (OpenAI's shape), the chosen one the
        # most likely when greedy, the alternatives in order; streamed, the same entries in chunks.
        lp_chat = {"model": "phone", "messages": [{"role": "user", "content": "Score me."}],
                   "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2}
        status, text = call(port, "POST", "/v1/chat/completions", lp_chat)
        r = json.loads(text)
        content = (r["choices"][0].get("logprobs") or {}).get("content", [])
        check(status == 200 and 1 <= len(content) <= 6, f"chat logprobs: {status} {text[:400]}")
        for e in content:
            top = e["top_logprobs"]
            check(isinstance(e["token"], str) and e["logprob"] <= 0 and isinstance(e["bytes"], list)
                  and len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"]
                  and abs(top[0]["logprob"] - e["logprob"]) < 1e-6, f"chat logprob entry: {e}")
        ev = events(call(port, "POST", "/v1/chat/completions", dict(lp_chat, stream=True))[1])
        streamed = [x for c in ev[:-1] for x in ((json.loads(c)["choices"][0].get("logprobs") or {})
                                                 .get("content") or [])]
        check([x["token"] for x in streamed] == [x["token"] for x in content] and
              all(abs(a["logprob"] - b["logprob"]) < 1e-3 for a, b in zip(streamed, content)),
              f"streamed chat logprobs: {streamed} vs {content}")
        off = {k: v for k, v in lp_chat.items() if k != "top_logprobs"}
        status, text = call(port, "POST", "/v1/chat/completions", dict(off, logprobs=False))
        check(status == 200 and json.loads(text)["choices"][0].get("logprobs") is None, "logprobs off")

        # Completions: the legacy shape, offsets into the completion's text.
        status, text = call(port, "POST", "/v1/completions", dict(body, logprobs=3))
        r = json.loads(text)
        lp = r["choices"][0].get("logprobs") or {}
        n = len(lp.get("tokens", []))
        check(status == 200 and n >= 1 and len(lp["token_logprobs"]) == n and len(lp["top_logprobs"]) == n
              and len(lp["text_offset"]) == n and lp["text_offset"] == sorted(lp["text_offset"])
              and all(len(t) <= 3 for t in lp["top_logprobs"])
              and all(max(t.values()) >= v - 1e-6 for t, v in zip(lp["top_logprobs"], lp["token_logprobs"])),
              f"completion logprobs: {status} {text[:400]}")

        # Echo (what lm-evaluation-harness sends to score a text): the prompt's tokens scored,
        # the first one null, values equal to gRPC's prompt_logprobs; no new token at all.
        score = {"model": "amoeba:depth=4,width=0.75", "prompt": "Score me, please", "max_tokens": 0,
                 "echo": True, "logprobs": 1, "temperature": 0}
        status, text = call(port, "POST", "/v1/completions", score)
        r = json.loads(text)
        lp = r["choices"][0].get("logprobs") or {}
        n = r.get("usage", {}).get("prompt_tokens", -1)
        check(status == 200 and r["choices"][0]["text"] == "Score me, please"
              and r["usage"]["completion_tokens"] == 0 and len(lp.get("tokens", [])) == n
              and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
              and all(v <= 0 for v in lp["token_logprobs"][1:]) and lp["text_offset"][0] == 0,
              f"echo scoring: {status} {text[:500]}")
        scored = [x for m in stub.Generate(pb.GenerateRequest(
            text="Score me, please", shape=pb.Shape(depth=4, width=0.75), max_new_tokens=0,
            logprobs=1, prompt_logprobs=True), metadata=md, timeout=30) for x in m.prompt_logprobs]
        check(len(scored) == n - 1 and all(abs(a.logprob - b) < 1e-5 for a, b in zip(scored, lp["token_logprobs"][1:])),
              f"echo logprobs == gRPC prompt_logprobs: {[a.logprob for a in scored]} vs {lp['token_logprobs']}")
        status, text = call(port, "POST", "/v1/completions", dict(score, max_tokens=3))
        r = json.loads(text)
        check(status == 200 and r["choices"][0]["text"].startswith("Score me, please")
              and len(r["choices"][0]["logprobs"]["tokens"]) == n + 3, f"echo and 3 new: {text[:300]}")
        ev = events(call(port, "POST", "/v1/completions", dict(score, max_tokens=3, stream=True))[1])
        first = json.loads(ev[0])["choices"][0]
        check(first["text"] == "Score me, please" and len(first["logprobs"]["tokens"]) == n,
              f"streamed echo: {ev[0][:300]}")
        status, text = call(port, "POST", "/v1/completions", dict(body, max_tokens=0))
        check(status == 400 and "max_new_tokens" in text, f"max_tokens 0 without echo: {status} {text[:200]}")

        # n choices: each its own draw (seed + i), indexed, the completions summed in usage;
        # streamed, every chunk names its choice, each choice finishes, one last chunk has usage.
        nb = dict(body, n=3, temperature=1.0, seed=11)
        status, text = call(port, "POST", "/v1/completions", nb)
        r = json.loads(text)
        ch = r.get("choices", [])
        check(status == 200 and [c["index"] for c in ch] == [0, 1, 2]
              and all(c["finish_reason"] == "length" for c in ch)
              and len({c["text"] for c in ch}) > 1 and r["usage"]["completion_tokens"] == 3 * 12,
              f"n=3: {status} {text[:400]}")
        one = json.loads(call(port, "POST", "/v1/completions", dict(body, temperature=1.0, seed=11))[1])
        check(one["choices"][0]["text"] == ch[0]["text"] or not exact, "choice 0 is the n=1 draw with the seed")
        g2 = dict(body, n=2)
        whole = [c["text"] for c in json.loads(call(port, "POST", "/v1/completions", g2)[1])["choices"]]
        ev = events(call(port, "POST", "/v1/completions", dict(g2, stream=True))[1])
        chunks = [json.loads(e) for e in ev[:-1]]
        texts, finished = ["", ""], [None, None]
        for c in chunks:
            for x in c["choices"]:
                texts[x["index"]] += x["text"]
                finished[x["index"]] = x["finish_reason"] or finished[x["index"]]
        check(ev[-1] == "[DONE]" and texts == whole and finished == ["length", "length"]
              and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24,
              f"streamed n=2: {texts} vs {whole}, {finished}, {chunks[-1]}")
        ev = events(call(port, "POST", "/v1/chat/completions", dict(chat, n=2, stream=True))[1])
        roles = [json.loads(e)["choices"][0]["index"] for e in ev[:-1]
                 if json.loads(e)["choices"] and json.loads(e)["choices"][0]["delta"].get("role")]
        check(roles == [0, 1], f"chat n=2 role chunks: {roles}")

        # A budget instead of a model: the planner's choice.
        sizes = sorted(x.params for x in stub.ListShapes(pb.ListShapesRequest(), metadata=md, timeout=10).shapes)
        budget = {"max_params": sizes[len(sizes) // 2]}
        plan = stub.Plan(pb.PlanRequest(budget=pb.Budget(max_params=budget["max_params"])), metadata=md,
                         timeout=10)
        status, text = call(port, "POST", "/v1/completions",
                            {"prompt": "x", "max_tokens": 2, "amoeba": {"budget": budget}})
        r = json.loads(text)
        check(status == 200 and r["amoeba"]["shape"]["depth"] == plan.chosen.shape.depth and
              abs(r["amoeba"]["shape"]["width"] - plan.chosen.shape.width) < 1e-9, f"budget: {text[:300]}")

        # Errors: status and the OpenAI error shape, naming what is wrong.
        for what, b, code, needle in [
                ("n=9", dict(body, n=9), 400, "n"),
                ("tools", dict(body, tools=[]), 400, "tools"),
                ("presence_penalty", dict(body, presence_penalty=3), 400, "sampling.presence_penalty"),
                ("logit_bias id", dict(body, logit_bias={"x": 1}), 400, "logit_bias"),
                ("logit_bias range", dict(body, logit_bias={"5": 101}), 400, "logit_bias"),
                ("min_p", dict(body, min_p=2), 400, "sampling.min_p"),
                ("logprobs range", dict(body, logprobs=6), 400, "logprobs"),
                ("echo type", dict(body, echo="yes"), 400, "echo"),
                ("top_logprobs alone", dict(chat, top_logprobs=2), 400, "top_logprobs"),
                ("top_logprobs range", dict(chat, logprobs=True, top_logprobs=21), 400, "top_logprobs"),
                ("negative temperature", dict(body, temperature=-1), 400, "sampling.temperature"),
                ("max_tokens too large", dict(body, max_tokens=10**6), 400, "max_new_tokens"),
                ("unknown model", dict(body, model="gpt-4"), 404, "gpt-4"),
                ("no model", {"prompt": "x"}, 400, "model"),
                ("bad role", dict(chat, messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
                ("budget nothing fits", {"prompt": "x", "amoeba": {"budget": {"max_params": 1}}}, 400,
                 "smallest"),
                ("bad draft", dict(body, amoeba={"speculate": "depth=99"}), 400, "speculate"),
                ("draft is the target", dict(body, amoeba={"speculate": "depth=4,width=0.75"}), 400, "speculate"),
                ("draft_tokens", dict(body, amoeba={"speculate": "off", "draft_tokens": 0}), 400, "draft_tokens")]:
            path = "/v1/chat/completions" if "messages" in b else "/v1/completions"
            status, text = call(port, "POST", path, b)
            err = json.loads(text).get("error", {})
            check(status == code and needle in err.get("message", "") and err.get("type"),
                  f"{what}: {status} {text[:300]}")
        status, text = call(port, "POST", "/v1/completions", raw="{not json")
        check(status == 400 and "error" in json.loads(text), f"bad JSON: {status}")
        status, _ = call(port, "POST", "/v1/completions", raw="x" * (2 << 20))
        check(status == 413, f"oversized body: {status}")
        status, text = call(port, "GET", "/v1/models", token=None)
        check(status == 401 and json.loads(text)["error"]["type"] == "invalid_request_error", "no token")
        status, _ = call(port, "GET", "/v1/models", token="wrong")
        check(status == 403, "wrong token")

        # Long requests for the checks below: greedy from a prompt that reaches max_tokens
        # without EOS (sampling could stop early and make the checks flaky).
        long_prompt = None
        for cand in ["Once", "The", "A long story", "Hello", "x y z", "We"]:
            st, t = call(port, "POST", "/v1/completions",
                         {"model": "full", "prompt": cand, "max_tokens": 190, "temperature": 0})
            if st == 200 and json.loads(t)["choices"][0]["finish_reason"] == "length":
                long_prompt = cand
                break
        check(long_prompt is not None, "a prompt whose greedy completion runs to max_tokens")

        # A client that goes away mid-stream cancels its request.
        s = socket.create_connection(("127.0.0.1", port))
        req = json.dumps({"model": "full", "prompt": long_prompt, "max_tokens": 190, "temperature": 0,
                          "stream": True})
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(req)}\r\n\r\n{req}").encode())
        s.recv(4096)
        s.close()
        cancelled = False
        for _ in range(100):
            _, m = call(port, "GET", "/metrics")
            if 'status="cancelled"' in m:
                cancelled = True
                break
            time.sleep(0.05)
        check(cancelled, "a disconnected stream is cancelled")
        check('amoeba_http_requests_total{route="/v1/completions",status="200"}' in m, "http metrics")

        # curl, as the README shows it.
        out = subprocess.run(["curl", "-s", f"http://127.0.0.1:{port}/v1/completions",
                              "-H", f"Authorization: Bearer {TOKEN}", "-H", "Content-Type: application/json",
                              "-d", json.dumps(body)], capture_output=True, text=True, timeout=60).stdout
        check(json.loads(out)["choices"][0]["text"] == want, f"curl: {out[:300]}")

        # The playground in headless Chromium: the page loads, lists the shapes, streams a greedy
        # generation into shape A's box (the same text as gRPC) and marks its shape on the
        # frontier; a screenshot is kept next to the test's output.
        status, page = call(port, "GET", "/", token=None)
        check(status == 200 and "Amoeba playground" in page, "playground page served")
        url = (f"http://127.0.0.1:{port}/?autorun=1&prompt=Hello%20there&tokens=12&temperature=0"
               f"&token={TOKEN}&shape=amoeba:depth%3D4,width%3D0.75")
        # Real time, not virtual time: the page streams its text in after the load event.
        with Browser() as browser:
            browser.navigate(url)
            browser.wait_for("document.title.startsWith('done: ')", timeout=120)
            dom = browser.evaluate("document.documentElement.outerHTML") or ""
            shot = os.path.join(os.environ.get("AMOEBA_TEST_OUT", d), "playground.png")
            browser.screenshot(shot)
        title = dom[dom.find("<title>"):dom.find("</title>") + 8]
        info = dom[dom.find('id="info"'):][:60] + " | " + dom[dom.find('id="outA"'):][:200]
        check("<title>done: amoeba:depth=4,width=0.75</title>" in dom, f"playground ran: {title} {info}")
        out_a = dom.split('id="outA">', 1)[1].split("</div>", 1)[0] if 'id="outA">' in dom else ""
        check(html.unescape(out_a) == want, f"playground text {out_a!r} != gRPC {want!r}")
        svg = dom[dom.find('<svg id="frontier"'):].split("</svg>", 1)[0]
        check(svg.count("<circle") == 12 and 'stroke="crimson"' in svg,
              f"frontier with the shape marked: {dom.count('<circle')} circles, {dom[dom.find('<svg'):][:300]}")
        check(os.path.getsize(shot) > 10000, "playground screenshot")

        # A full queue is 429 (2 slots per shape, 1 waiting request); draining is 503.
        import threading
        long_body = {"model": "full", "prompt": long_prompt, "max_tokens": 190, "temperature": 0}
        codes = []
        def busy():
            codes.append(call(port, "POST", "/v1/completions", long_body)[0])
        threads = [threading.Thread(target=busy) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        check(429 in codes and 200 in codes and set(codes) <= {200, 429}, f"queue full: {codes}")
        # Draining: while a streamed request is surely running (its first chunk arrived), SIGTERM
        # makes /health 503 and new completions 503; the running one still completes.
        s = socket.create_connection(("127.0.0.1", port))
        req = json.dumps(dict(long_body, stream=True))
        s.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(req)}\r\n\r\n{req}").encode())
        got = s.recv(65536)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        status, text = call(port, "GET", "/health", token=None)
        check(status == 503, f"/health while draining: {status}")
        status, text = call(port, "POST", "/v1/completions", body)
        check(status == 503 and json.loads(text)["error"]["type"] == "server_error", f"draining: {status}")
        s.settimeout(60)
        while b"[DONE]" not in got:
            more = s.recv(65536)
            if not more:
                break
            got += more
        s.close()
        check(b"[DONE]" in got and b'"finish_reason":"length"' in got, "the running stream completes")
    finally:
        stop_server(proc)
    print(f"http_api: {checks} passed, 0 failed")
