"""What a hostile or careless client can do to the HTTP front end, reproduced against the real
amoeba-server on loopback (bounded: a few thousand sockets-seconds, under a minute). During each
attack a well-behaved client must still get /health and a short completion within 1 s.

Attacks: 64 slow connections (one header byte at a time), 32 abandoned non-streamed completions,
a streaming client that stops reading, oversized chunked and Content-Length bodies (alone, four at
once, and without the token), oversized headers, the unauthenticated walk of every route and
method on both front ends, strict parsing (conflicting lengths, signed lengths, obs-fold,
pipelining), browser safety (content types, origins, hosts, the playground's headers), and SIGTERM
under slow connections (exit within --drain-seconds + 1 s).

Usage: http_attack_test.py AMOEBA_ADMIN AMOEBA_SERVER PROTO_PYTHON_DIR"""
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

admin, server_bin, stubs = sys.argv[1:4]
sys.path.insert(0, stubs)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from server_process import make_supernet, start_server, stop_server  # noqa: E402
from slow_clients import SlowClients  # noqa: E402
import grpc  # noqa: E402  (Debian's python3-grpcio)
from amoeba.v1 import amoeba_pb2 as pb, amoeba_pb2_grpc as rpc  # noqa: E402

TOKEN = "attack-token"
AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
checks = 0


def check(cond, what):
    global checks
    if not cond:
        sys.exit(f"FAIL: {what}")
    checks += 1
    print(f"ok: {what}", flush=True)


def call(port, method, path, body=None, headers=None, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body) if isinstance(body, (dict, list)) else body
    c.request(method, path, body=data, headers=AUTH if headers is None else headers)
    r = c.getresponse()
    text = r.read().decode(errors="replace")
    c.close()
    return r.status, text, dict(r.getheaders())


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric(port, name, labels=""):
    """Sum of a metric's samples whose labels contain `labels`."""
    _, text, _ = call(port, "GET", "/metrics")
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def well_behaved(port, what):
    """/health and a 4-token completion, each within 1 s."""
    t = time.monotonic()
    status, _, _ = call(port, "GET", "/health", headers={}, timeout=1)
    health = time.monotonic() - t
    t = time.monotonic()
    status2, text, _ = call(port, "POST", "/v1/completions",
                            {"model": "smallest", "prompt": "Hi", "max_tokens": 4, "temperature": 0}, timeout=1)
    completion = time.monotonic() - t
    check(status == 200 and status2 == 200 and health < 1 and completion < 1,
          f"{what}: /health {status} in {health * 1000:.0f} ms, completion {status2} in {completion * 1000:.0f} ms")


def read_until_closed(s):
    """What the server sends until it closes (or resets) the connection."""
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                break
            out += b
    except OSError:
        pass
    return out


def raw(port, data, read=True, timeout=5):
    """Sends bytes on a fresh connection; returns what comes back until the server closes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
    except OSError:
        pass
    out = read_until_closed(s) if read else b""
    s.close()
    return out.decode(errors="replace")


with tempfile.TemporaryDirectory() as d:
    supernet = make_supernet(admin, d, seed=4)
    args = ["--http-port", "0", "--metrics-port", "0", "--auth-token", TOKEN, "--auth-all",
            "--max-context", "1100", "--max-new-tokens", "1024", "--max-concurrent", "16",
            "--queue-size", "64", "--drain-seconds", "3", "--http-header-timeout-ms", "4000",
            "--http-stream-buffer-bytes", "16384", "--http-socket-send-buffer-bytes", "16384", "--allowed-origins", "https://app.example",
            "--threads", "2"]
    proc, ports = start_server(server_bin, supernet, d, *args)
    try:
        grpc_port, metrics_port, port = (int(p) for p in ports)
        # (start_server passes --metrics-port -1 first; ours comes later and wins)
        idle_rss = rss_kb(proc.pid)
        well_behaved(port, "idle")

        # 1. Slow connections: 64 drip-feeding clients hold no thread; the head deadline ends them.
        slow = SlowClients(port, 64)
        time.sleep(1.0)
        well_behaved(port, "64 slow connections")
        check(slow.open_count() == 64, "the slow connections are open while within the head deadline")
        time.sleep(4.0)
        check(slow.open_count() == 0, "the slow connections are closed at the 4 s head deadline")
        slow.close()

        # 2. Abandoned non-streamed completions: the work stops when the client leaves.
        before_gen = metric(port, "amoeba_tokens_total", 'kind="generated"')
        cancelled_before = metric(port, "amoeba_requests_total", "cancel")
        socks = []
        body = json.dumps({"model": "full", "prompt": "Once upon a time", "max_tokens": 1024,
                           "temperature": 0}).encode()
        for _ in range(32):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            socks.append(s)
        for s in socks:  # right after sending, as a client that gives up would
            s.close()
        well_behaved(port, "32 abandoned completions")
        time.sleep(0.5)
        after = metric(port, "amoeba_tokens_total", 'kind="generated"')
        time.sleep(1.0)
        later = metric(port, "amoeba_tokens_total", 'kind="generated"')
        running = metric(port, "amoeba_running_requests")
        check(later - after <= 8 and running == 0,
              f"abandoned generations stopped: {later - after:.0f} tokens in the last second, running {running}")
        cancelled = metric(port, "amoeba_requests_total", "cancel") - cancelled_before
        check(cancelled >= 16, f"the abandoned requests were started and cancelled: {cancelled:.0f} of 32")
        check(after - before_gen < 32 * 1024 / 4,
              f"abandoned work was cut short: {after - before_gen:.0f} of {32 * 1024} tokens generated")

        # 3. A streaming client that stops reading is dropped after a bounded buffer.
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        body = json.dumps({"model": "full", "prompt": "Once upon a time", "max_tokens": 1024,
                           "temperature": 0, "stream": True}).encode()
        cancelled_before = metric(port, "amoeba_requests_total", "cancel")
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
        well_behaved(port, "a streaming client that does not read")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and metric(port, "amoeba_requests_total", "cancel") == cancelled_before:
            time.sleep(0.2)
        check(metric(port, "amoeba_requests_total", "cancel") > cancelled_before,
              "the non-reading stream was cancelled once its buffer filled")
        s.close()

        # 4. Oversized bodies: refused as they arrive, without holding them.
        def post_chunked(total, token=True, results=None):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            if token:
                head += f"Authorization: Bearer {TOKEN}\r\n".encode()
            s.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n" % (1 << 20) + b"a" * (1 << 20) + b"\r\n"
            sent = 0
            try:
                while sent < total:
                    s.sendall(chunk)
                    sent += 1 << 20
            except OSError:
                pass
            out = read_until_closed(s)
            s.close()
            status = out.split(b" ", 2)[1].decode() if out.startswith(b"HTTP/1.1") else "none"
            if results is not None:
                results.append((status, sent))
            return status, sent

        peak = [rss_kb(proc.pid)]
        watching = threading.Event()

        def watch_rss():
            while not watching.is_set():
                peak[0] = max(peak[0], rss_kb(proc.pid))
                time.sleep(0.02)

        w = threading.Thread(target=watch_rss, daemon=True)
        w.start()
        # (The server answers 413, reads a bounded amount more so the client can read it, then
        # closes; a client that keeps sending may see the reset before the answer: "none".)
        status, sent = post_chunked(512 << 20)
        check(status in ("413", "none") and sent < (64 << 20), f"512 MB chunked body: {status} after {sent >> 20} MiB sent")
        results = []
        ts = [threading.Thread(target=post_chunked, args=(256 << 20, True, results)) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        check(len(results) == 4 and all(r[0] in ("413", "none") and r[1] < (64 << 20) for r in results),
              f"four 256 MB chunked bodies at once: {results}")
        status, sent = post_chunked(256 << 20, token=False)
        check(status in ("401", "none") and sent < (64 << 20), f"a 256 MB body without the token: {status} after {sent >> 20} MiB")
        # The token is checked on the head: a client that waits for the answer before sending
        # its body (Expect: 100-continue) gets it without sending a byte of it.
        reply = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Expect: 100-continue\r\nContent-Length: 268435456\r\n\r\n")
        check(reply.startswith("HTTP/1.1 401"), f"a 256 MB body announced without the token: {reply[:40]!r}")
        reply = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {2 << 20}\r\n\r\n".encode())
        check(reply.startswith("HTTP/1.1 413"), f"a 2 MiB Content-Length, refused on the head: {reply[:40]!r}")
        # Most clients send the whole declared body before reading: the server reads and drops
        # it (up to a bound) so they get the 413, not a reset while sending. 8 MiB is more than
        # the loopback socket buffers hold, so a server that closed early would reset this one.
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {8 << 20}\r\n\r\n".encode())
        try:
            s.sendall(b"x" * (8 << 20))
            reply = read_until_closed(s)
        except OSError as e:
            reply = repr(e).encode()
        s.close()
        check(reply.startswith(b"HTTP/1.1 413"), f"an 8 MiB body sent in full before reading: {reply[:60]!r}")
        reply = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {(1 << 63) - 1}\r\n\r\n".encode())
        check(reply.startswith("HTTP/1.1 413"), f"a Content-Length of 2^63 - 1: {reply[:40]!r}")
        # 5. Oversized headers.
        reply = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        check(reply.startswith("HTTP/1.1 431"), f"1 MiB of headers: {reply[:40]!r}")
        reply = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n")
        check(reply.startswith("HTTP/1.1 431"), f"200 header fields: {reply[:40]!r}")
        watching.set()
        w.join()
        check(peak[0] < 2 * idle_rss, f"RSS under the body and header attacks: peak {peak[0] >> 10} MiB, "
                                      f"idle {idle_rss >> 10} MiB")
        well_behaved(port, "after the oversized requests")

        # 6. Every route and method without the token under --auth-all: only /health is open.
        routes = ["/", "/health", "/metrics", "/metrics?x=1", "/v1/models", "/v1/completions",
                  "/v1/chat/completions", "/v1/amoeba/shapes", "/v1/amoeba/export", "/tokenize",
                  "/detokenize"]
        for path in routes:
            for method in ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]:
                status, text, _ = call(port, method, path, body="{}" if method != "GET" else None,
                                       headers={"Content-Type": "application/json"})
                if path in ("/health", "/") and method in ("GET", "HEAD"):  # documented as open
                    ok = status == 200 and (path == "/health" or method == "HEAD" or "playground" in text)
                elif path in ("/health", "/"):
                    ok = status == 405
                else:
                    get_route = path.split("?")[0] in ("/", "/metrics", "/v1/models", "/v1/amoeba/shapes")
                    allowed = method in ("GET", "HEAD") if get_route else method == "POST"
                    ok = status == 401 if allowed else status == 405
                check(ok, f"no token: {method} {path} -> {status}")
        for path in ["/%6detrics", "/METRICS", "/metrics/", "//metrics"]:
            status, _, _ = call(port, "GET", path, headers={})
            check(status == 404, f"no token: GET {path} -> {status}")
        status, _, _ = call(metrics_port, "GET", "/metrics", headers={})
        check(status == 401, f"no token: metrics port /metrics -> {status}")
        status, text, _ = call(metrics_port, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        check(status == 200 and "amoeba_" in text, f"metrics port with the token: {status}")
        status, _, _ = call(metrics_port, "GET", "/health", headers={})
        check(status == 200, f"metrics port /health stays open: {status}")
        # gRPC: every Amoeba RPC needs the token; health is open; reflection is not served.
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        for name, (req_type, streaming) in {
                "Generate": (pb.GenerateRequest, True), "Plan": (pb.PlanRequest, False),
                "ListShapes": (pb.ListShapesRequest, False), "GetModelInfo": (pb.GetModelInfoRequest, False),
                "Tokenize": (pb.TokenizeRequest, False), "ExportSubnet": (pb.ExportSubnetRequest, True)}.items():
            method = f"/amoeba.v1.Amoeba/{name}"
            f = (channel.unary_stream if streaming else channel.unary_unary)(
                method, request_serializer=req_type.SerializeToString, response_deserializer=lambda b: b)
            try:
                r = f(req_type(), timeout=5)
                if streaming:
                    list(r)
                code = grpc.StatusCode.OK
            except grpc.RpcError as e:
                code = e.code()
            check(code == grpc.StatusCode.UNAUTHENTICATED, f"gRPC {name} without the token -> {code}")
        health = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda x: x,
                                     response_deserializer=lambda b: b)
        check(health(b"", timeout=5) is not None, "gRPC health answers without the token")
        refl = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                     request_serializer=lambda x: x, response_deserializer=lambda b: b)
        try:
            list(refl(iter([b"\x3a\x00"]), timeout=5))  # list_services
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
        check(code == grpc.StatusCode.UNIMPLEMENTED, f"gRPC reflection under --auth-all -> {code}")

        # 7. Strict parsing.
        def status_of(reply):
            m = re.match(r"HTTP/1\.1 (\d+)", reply)
            return int(m.group(1)) if m else None
        tok = f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n".encode()
        r = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + tok +
                b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
        check(status_of(r) == 400, f"two different Content-Lengths -> {r[:30]!r}")
        r = raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + tok + b"Content-Length: +2\r\n\r\n{}")
        check(status_of(r) == 400, f"a signed Content-Length -> {r[:30]!r}")
        r = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n")
        check(status_of(r) == 400, f"obs-fold -> {r[:30]!r}")
        r = raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        check(r.count("HTTP/1.1 200") == 2, f"two pipelined requests get two answers: {r.count('HTTP/1.1 200')}")
        for field, value in [("user", 5), ("user", {"a": 1}), ("stream_options", "yes"), ("stream_options", [1])]:
            status, text, _ = call(port, "POST", "/v1/completions", {"model": "smallest", "prompt": "x", field: value})
            check(status == 400 and field in text, f"{field}={value!r} -> {status} {text[:100]}")

        # 8. Browser safety.
        plain = dict(AUTH, **{"Content-Type": "text/plain"})
        status, _, _ = call(port, "POST", "/v1/completions", json.dumps({"model": "smallest", "prompt": "x"}), plain)
        check(status == 415, f"a text/plain POST -> {status}")
        form = dict(AUTH, **{"Content-Type": "application/x-www-form-urlencoded"})
        status, _, _ = call(port, "POST", "/v1/completions", "a=b", form)
        check(status == 415, f"a form POST -> {status}")
        evil = dict(AUTH, Origin="https://evil.example")
        status, _, _ = call(port, "POST", "/v1/completions", {"model": "smallest", "prompt": "x", "max_tokens": 1}, evil)
        check(status == 403, f"a POST from another origin -> {status}")
        good = dict(AUTH, Origin="https://app.example")
        status, _, h = call(port, "POST", "/v1/completions", {"model": "smallest", "prompt": "x", "max_tokens": 1}, good)
        check(status == 200 and h.get("Access-Control-Allow-Origin") == "https://app.example",
              f"a POST from an allowed origin -> {status} {h.get('Access-Control-Allow-Origin')}")
        pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
               "Access-Control-Request-Headers": "authorization, content-type"}
        status, _, h = call(port, "OPTIONS", "/v1/chat/completions", headers=pre)
        check(status == 204 and "POST" in h.get("Access-Control-Allow-Methods", "")
              and "Authorization" in h.get("Access-Control-Allow-Headers", ""), f"preflight from an allowed origin -> {status} {h}")
        status, _, _ = call(port, "OPTIONS", "/v1/chat/completions", headers=dict(pre, Origin="https://evil.example"))
        check(status == 403, f"preflight from another origin -> {status}")
        status, _, h = call(port, "GET", "/", headers={})
        check(status == 200 and "frame-ancestors 'none'" in h.get("Content-Security-Policy", "")
              and h.get("X-Frame-Options") == "DENY", f"playground headers: {h}")
        well_behaved(port, "after the parsing and browser checks")
    finally:
        if proc.poll() is None:
            stop_server(proc)

    # 9. --allowed-hosts, then SIGTERM under 64 slow connections: exit within drain + 1 s.
    proc, ports = start_server(server_bin, supernet, d, "--http-port", "0", "--drain-seconds", "2",
                               "--allowed-hosts", "localhost", "--allowed-hosts", "127.0.0.1")
    port = int(ports[2])
    status, _, _ = call(port, "GET", "/health", headers={"Host": "evil.example:80"})
    check(status == 421, f"a Host not in --allowed-hosts -> {status}")
    status, _, _ = call(port, "GET", "/health", headers={"Host": f"127.0.0.1:{port}"})
    check(status == 200, f"an allowed Host -> {status}")
    slow = SlowClients(port, 64, every=0.5)
    streaming = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"model": "full", "prompt": "Once", "max_tokens": 1024, "stream": True}).encode()
    streaming.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    time.sleep(1.0)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        sys.exit("FAIL: the server did not exit within 10 s of SIGTERM under slow connections")
    took = time.monotonic() - t
    slow.close()
    streaming.close()
    check(proc.returncode == 0 and took < 2 + 1, f"SIGTERM under 64 slow connections: exit {proc.returncode} in {took:.1f} s")

    # 10. HTTPS on the same transport: a TLS client is served; a client that never finishes its
    # handshake is cut at the head deadline like a slow one.
    import ssl
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/key.pem",
                    "-out", f"{d}/cert.pem", "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True)
    proc, ports = start_server(server_bin, supernet, d, "--http-port", "0", "--tls-cert", f"{d}/cert.pem",
                               "--tls-key", f"{d}/key.pem", "--http-header-timeout-ms", "1000")
    try:
        port = int(ports[2])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(b"\x16\x03\x01")  # the start of a ClientHello, never finished
        ctx = ssl.create_default_context(cafile=f"{d}/cert.pem")
        ctx.check_hostname = False
        c = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
        c.request("POST", "/v1/completions", body=json.dumps({"model": "smallest", "prompt": "Hi", "max_tokens": 3}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        body = json.loads(r.read())
        check(r.status == 200 and body["usage"]["completion_tokens"] == 3, f"HTTPS completion: {r.status}")
        time.sleep(1.5)
        stalled.settimeout(1)
        try:
            gone = stalled.recv(1) == b""
        except OSError:
            gone = True
        check(gone, "a TLS handshake that never finishes is cut at the head deadline")
        stalled.close()
    finally:
        stop_server(proc)

print(f"{checks} passed, 0 failed")
