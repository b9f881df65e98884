#!/usr/bin/python3
"""Structured output and tool calls through the HTTP front end of a real amoeba-server: 200 random JSON schemas
on two shapes (the full one, with a draft for half the requests, and the smallest), four clients
at a time so grammars share batched steps; every output must parse and validate (python3-jsonschema,
an independent validator) and end with finish_reason "stop". Then json_object, a GBNF grammar,
and the errors (unsupported keywords, bad grammars) as 400s naming what is wrong.
Usage: structured_output_test.py AMOEBA_ADMIN AMOEBA_SERVER [SCHEMAS]"""
import concurrent.futures
import http.client
import json
import os
import random
import sys
import tempfile

import jsonschema

from server_process import make_supernet, start_server, stop_server

admin, server_bin = sys.argv[1:3]
n_schemas = int(sys.argv[3]) if len(sys.argv) > 3 else 200


def random_schema(rng, depth=0):
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "array", "anyof"]
    if depth < 2:
        kinds += ["object", "object"]
    k = rng.choice(kinds)
    if k == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 8)}
        if rng.random() < 0.3:
            s["minLength"] = rng.randint(0, s["maxLength"])
        return s
    if k in ("integer", "number", "boolean", "null"):
        return {"type": k}
    if k == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None, "a b"], rng.randint(1, 4))}
    if k == "const":
        return {"const": rng.choice(["x", 7, False, None, "é"])}
    if k == "array":
        s = {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(1, 3)}
        if rng.random() < 0.5:
            s["minItems"] = rng.randint(0, s["maxItems"])
        return s
    if k == "anyof":
        return {"anyOf": [random_schema(rng, depth + 1), {"type": "null"}]}
    props = {f"p{i}_{rng.randint(0, 99)}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 4))}
    names = list(props)
    return {"type": "object", "properties": props,
            "required": rng.sample(names, rng.randint(0, len(names))),
            "additionalProperties": False, "title": "annotations are ignored"}


def post(port, path, body):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    return r.status, json.loads(r.read())


failures = []


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL:", what, file=sys.stderr)


with tempfile.TemporaryDirectory() as d:
    supernet = make_supernet(admin, d, seed=9)
    proc, ports = start_server(server_bin, supernet, d, "--http-port", "0", "--profile", "0")
    try:
        port = int(ports[2])
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/v1/models")
        models = json.loads(c.getresponse().read())["data"]
        by_size = sorted(models, key=lambda m: m["amoeba"]["params"])
        full, small = by_size[-1], by_size[0]
        draft = small["amoeba"]["shape"]
        shape_of = lambda m: f'depth={m["amoeba"]["shape"]["depth"]},width={m["amoeba"]["shape"]["width"]}'

        rng = random.Random(1234)
        jobs = []
        for i in range(n_schemas):
            # Mostly objects at the top, as OpenAI requires; every fourth anything.
            schema = random_schema(rng)
            while i % 4 and schema.get("type") != "object":
                schema = random_schema(rng)
            for m in (full, small):
                body = {"model": m["id"], "max_tokens": 400, "seed": i,
                        "temperature": 0.9 if i % 3 == 0 else 0,
                        "messages": [{"role": "user", "content": f"Give me JSON number {i}."}],
                        "response_format": {"type": "json_schema",
                                            "json_schema": {"name": f"s{i}", "schema": schema, "strict": True}}}
                if m is full and i % 2 == 0:
                    body["amoeba"] = {"speculate": shape_of(small), "draft_tokens": 3}
                jobs.append((i, m["id"], schema, body))

        def run_one(job):
            i, model, schema, body = job
            status, r = post(port, "/v1/chat/completions", body)
            return i, model, schema, status, r

        ok = 0
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for i, model, schema, status, r in pool.map(run_one, jobs):
                where = f"schema {i} on {model}"
                if status != 200:
                    check(False, f"{where}: HTTP {status} {r}")
                    continue
                choice = r["choices"][0]
                text = choice["message"]["content"]
                check(choice["finish_reason"] == "stop", f"{where}: finish_reason {choice['finish_reason']}: {text!r}")
                try:
                    value = json.loads(text)
                    jsonschema.validate(value, schema)
                    ok += 1
                    if i < 2:
                        print(f"{where}: {text!r}")
                except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                    check(False, f"{where}: {e}\nschema {json.dumps(schema)}\noutput {text!r}")
        print(f"{ok} of {len(jobs)} outputs parsed and validated")

        # json_object: any object; a GBNF grammar; and the completions endpoint takes both.
        status, r = post(port, "/v1/chat/completions", {
            "model": full["id"], "max_tokens": 300, "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"}})
        text = r["choices"][0]["message"]["content"] if status == 200 else ""
        if status == 200 and r["choices"][0]["finish_reason"] == "stop":
            check(isinstance(json.loads(text), dict), f"json_object gave {text!r}")
        check(status == 200 and text.startswith("{"), f"json_object: {status} {r}")
        status, r = post(port, "/v1/completions", {
            "model": small["id"], "max_tokens": 50, "prompt": "The answer:",
            "grammar": 'root ::= ("yes" | "no") ", " [0-9]{2}'})
        text = r["choices"][0]["text"] if status == 200 else ""
        check(status == 200 and r["choices"][0]["finish_reason"] == "stop" and
              text[:3] in ("yes", "no,") and len(text) in (6, 7) and text[-2:].isdigit(),
              f"grammar: {status} {r}")

        # A hostile grammar (ambiguity doubles its stacks at every byte) ends its sequence within
        # bounded time and memory instead of taking the server down.
        import time
        t0 = time.monotonic()
        status, r = post(port, "/v1/completions", {
            "model": small["id"], "max_tokens": 400, "prompt": "x",
            "grammar": 'root ::= "a" root "b" | "a" root "c" | ""'})
        check(status == 200 and set(r["choices"][0]["text"]) <= set("abc") and
              time.monotonic() - t0 < 60, f"hostile grammar: {status} {time.monotonic() - t0:.1f} s {r}")

        # Tools: calls generated under each function's schema, in OpenAI's shape.
        tools = [
            {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
             "parameters": {"type": "object", "properties": {
                 "city": {"type": "string", "maxLength": 10},
                 "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
                 "additionalProperties": False}}},
            {"type": "function", "function": {"name": "add", "parameters": {
                "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"], "additionalProperties": False}}},
        ]
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        user = [{"role": "user", "content": "What is the weather in Paris?"}]

        def check_calls(message, where, only=None, at_most=None):
            calls = message.get("tool_calls") or []
            check(message.get("content") is None and calls, f"{where}: no calls in {message}")
            if at_most:
                check(len(calls) <= at_most, f"{where}: {len(calls)} calls")
            for c in calls:
                name = c["function"]["name"]
                check(c["type"] == "function" and c["id"], f"{where}: {c}")
                check(name in schemas and (only is None or name == only), f"{where}: called {name}")
                try:
                    jsonschema.validate(json.loads(c["function"]["arguments"]), schemas.get(name, {}))
                except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                    check(False, f"{where}: arguments {c['function']['arguments']!r}: {e}")

        for m in (full, small):
            for seed in range(6):
                status, r = post(port, "/v1/chat/completions", {
                    "model": m["id"], "messages": user, "tools": tools, "tool_choice": "required",
                    "max_tokens": 800, "seed": seed, "temperature": 0.8,
                    "parallel_tool_calls": seed % 2 == 0})
                where = f"required on {m['id']} seed {seed}"
                check(status == 200, f"{where}: {status} {r}")
                if status == 200:
                    check(r["choices"][0]["finish_reason"] == "tool_calls", f"{where}: {r['choices'][0]}")
                    check_calls(r["choices"][0]["message"], where, at_most=4 if seed % 2 == 0 else 1)
        status, r = post(port, "/v1/chat/completions", {
            "model": full["id"], "messages": user, "tools": tools, "max_tokens": 800,
            "tool_choice": {"type": "function", "function": {"name": "add"}}})
        check(status == 200, f"named: {status} {r}")
        if status == 200:
            check_calls(r["choices"][0]["message"], "named", only="add")
        for seed in range(4):  # auto: text or calls, each well formed
            status, r = post(port, "/v1/chat/completions", {
                "model": small["id"], "messages": user, "tools": tools, "max_tokens": 60,
                "seed": seed, "temperature": 1.0})
            msg = r["choices"][0]["message"] if status == 200 else {}
            check(status == 200, f"auto: {status} {r}")
            if msg.get("tool_calls"):
                check_calls(msg, f"auto seed {seed}")
            else:
                check(isinstance(msg.get("content"), str) and not msg["content"].startswith("<"),
                      f"auto seed {seed}: {msg}")
        # Streamed: one tool_calls delta, then finish_reason tool_calls.
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        c.request("POST", "/v1/chat/completions", json.dumps({
            "model": full["id"], "messages": user, "tools": tools, "tool_choice": "required",
            "max_tokens": 800, "stream": True}), {"Content-Type": "application/json"})
        events = [json.loads(l[6:]) for l in c.getresponse().read().decode().splitlines()
                  if l.startswith("data: {")]
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        check(len(calls) == 1 and all("index" in t for t in calls[0]), f"streamed calls: {deltas}")
        check(not any(d.get("content") for d in deltas), f"streamed content beside calls: {deltas}")
        check(events[-1]["choices"][0]["finish_reason"] == "tool_calls", f"streamed finish: {events[-1]}")
        if calls:
            check_calls({"content": None, "tool_calls": calls[0]}, "streamed")
        # A conversation that carries a call and its result goes through the template.
        status, r = post(port, "/v1/chat/completions", {
            "model": full["id"], "tools": tools, "max_tokens": 20, "messages": user + [
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"}],
            "tool_choice": "none"})
        check(status == 200 and isinstance(r["choices"][0]["message"]["content"], str), f"history: {status} {r}")

        # Errors: a clear 400 naming what is wrong.
        for body, want in [
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}}, "pattern"),
            ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
            ({"response_format": {"type": "xml"}}, "xml"),
            ({"grammar": "root ::= missing"}, "missing"),
            ({"grammar": "root ::= \"a\"", "response_format": {"type": "json_object"}}, "grammar"),
            ({"tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}, "no function named 'g'"),
            ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name"),
            ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
              "properties": {"x": {"type": "string", "format": "email"}}}}}]}, "'format'"),
            ({"tool_choice": "required"}, "needs tools"),
            # Hostile nesting is a 400, not a crash: 20,000 groups; 500 nested schemas.
            ({"grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000}, "nested too deep"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
              json.loads('{"type": "array", "items": ' * 500 + '{}' + '}' * 500)}}}, "nesting deeper"),
            ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
        ]:
            body = {"model": full["id"], "messages": [{"role": "user", "content": "x"}], **body}
            status, r = post(port, "/v1/chat/completions", body)
            check(status == 400 and want in json.dumps(r), f"{body} -> {status} {r}")
    finally:
        stop_server(proc)

    # A model's own Jinja template (--chat-template FILE): Qwen 2.5's renders the tools itself;
    # Gemma 2's refuses a system message, which is a 400 carrying its words.
    here = os.path.dirname(os.path.abspath(__file__))
    for template, body, want in [
        ("Qwen-Qwen2.5-7B-Instruct.jinja", {"tools": tools, "tool_choice": "required", "max_tokens": 800}, 200),
        ("google-gemma-2-2b-it.jinja", {"messages": [{"role": "system", "content": "x"},
                                                     {"role": "user", "content": "hi"}]}, 400),
    ]:
        proc, ports = start_server(server_bin, supernet, d, "--http-port", "0", "--profile", "0",
                                   "--chat-template", os.path.join(here, "chat_templates", template))
        try:
            port = int(ports[2])
            body = {"model": "full", "messages": user, **body}
            status, r = post(port, "/v1/chat/completions", body)
            check(status == want, f"{template}: {status} {r}")
            if want == 200 and status == 200:
                check_calls(r["choices"][0]["message"], template)
            if want == 400:
                check("System role not supported" in json.dumps(r), f"{template}: {r}")
        finally:
            stop_server(proc)
        check("chat template jinja" in open(f"{d}/server.log").read(), f"{template}: not rendered as Jinja")
    if failures:
        print(open(f"{d}/server.log").read()[-3000:], file=sys.stderr)
        sys.exit(f"FAIL: {len(failures)} checks failed")
    print("OK")
