"""bench/http_transport: the HTTP transport under attack, side by side with cpp-httplib configured
as well as it can be (bench/httplib_baseline.cc: a pool of worker threads, read/write/keep-alive
timeouts, the body limit). For each server: /health latency idle and under 64 and 1000
slow connections (a header byte every 0.2 s; the probe from the same address and from another), a 512 MB chunked body (status, RSS growth), 64 MB
of headers (status, RSS growth) and the time to exit after SIGTERM under 64 slow connections.
Writes bench/results/http_transport.{json,md}.

Usage: /usr/bin/python3 bench/http_transport.py BUILD_DIR"""
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

build = sys.argv[1] if len(sys.argv) > 1 else "build"
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(root, "tests"))
from server_process import make_supernet, start_server  # noqa: E402
from slow_clients import SlowClients  # noqa: E402


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def health_ms(port, timeout=3.0, source="127.0.0.1"):
    """One GET /health on a fresh connection from `source`: milliseconds, or None on timeout or
    refusal."""
    t = time.monotonic()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = s.recv(64)
        s.close()
        if not got.startswith(b"HTTP/1.1 200"):
            return None
    except OSError:
        return None
    return (time.monotonic() - t) * 1000


def median_health(port, n=5, source="127.0.0.1"):
    vals = [health_ms(port, source=source) for _ in range(n)]
    ok = [v for v in vals if v is not None]
    return round(statistics.median(ok), 2) if len(ok) == n else None


def reply_status(s):
    """The status code of the server's reply on `s`, or "none" when it sent none."""
    try:
        got = s.recv(64)
        return got.split(b" ")[1].decode() if got.startswith(b"HTTP/1.1") else "none"
    except OSError:
        return "none"


def chunked_body(port, pid, total):
    peak = [rss_mb(pid)]
    base = peak[0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.01)

    w = threading.Thread(target=watch, daemon=True)
    w.start()
    t = time.monotonic()
    status = "none"
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % (1 << 20) + b"a" * (1 << 20) + b"\r\n"
        sent = 0
        try:
            while sent < total:
                s.sendall(chunk)
                sent += 1 << 20
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass
        status = reply_status(s)
        s.close()
    except OSError:
        pass
    done.set()
    w.join()
    return {"status": status, "rss_growth_mb": round(peak[0] - base, 1),
            "seconds": round(time.monotonic() - t, 2)}


def big_headers(port, pid, total):
    base = rss_mb(pid)
    peak = base
    status = "none"
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        line = b"X-Pad: " + b"a" * 91 + b"\r\n"
        block = line * 10000
        sent = 0
        try:
            while sent < total:
                s.sendall(block)
                sent += len(block)
                peak = max(peak, rss_mb(pid))
            s.sendall(b"\r\n")
        except OSError:
            pass
        status = reply_status(s)
        s.close()
    except OSError:
        pass
    peak = max(peak, rss_mb(pid))
    return {"status": status, "rss_growth_mb": round(peak - base, 1)}


def sigterm_under_slow(proc, port):
    slow = SlowClients(port, 64)
    time.sleep(0.5)
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
        took = round(time.monotonic() - t, 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        took = None
    slow.close()
    return took


def measure(name, proc, port):
    r = {"server": name, "idle_health_ms": median_health(port)}
    for n in (64, 1000):
        slow = SlowClients(port, n)
        time.sleep(0.5)
        r[f"slow_connections_accepted_of_{n}"] = slow.open_count()
        r[f"health_ms_under_{n}_slow"] = median_health(port)
        # The probe from another address (Linux routes all of 127/8 to loopback): past the
        # per-address cap the attacker's address is refused, other clients are not.
        r[f"health_ms_under_{n}_slow_other_address"] = median_health(port, source="127.0.0.2")
        slow.close()
        time.sleep(0.5)
    r["chunked_512mb"] = chunked_body(port, proc.pid, 512 << 20)
    r["headers_64mb"] = big_headers(port, proc.pid, 64 << 20)
    r["sigterm_exit_s_under_64_slow"] = sigterm_under_slow(proc, port)
    return r


def start_httplib(d, threads):
    pf = f"{d}/httplib.port"
    if os.path.exists(pf):
        os.remove(pf)
    p = subprocess.Popen([f"{build}/bench/amoeba-bench-httplib-baseline", "--threads", str(threads),
                          "--port-file", pf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        if os.path.exists(pf) and open(pf).read().strip():
            return p, int(open(pf).read())
        time.sleep(0.05)
    sys.exit("httplib baseline did not start")


def cpu_model():
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


with tempfile.TemporaryDirectory() as d:
    results = []
    for threads in (8, 64):
        p, port = start_httplib(d, threads)
        results.append(measure(f"cpp-httplib 0.11, {threads} threads", p, port))
    supernet = make_supernet(f"{build}/admin/amoeba-admin", d, seed=4)
    proc, ports = start_server(f"{build}/server/amoeba-server", supernet, d, "--http-port", "0",
                               "--drain-seconds", "5", "--threads", "1")
    results.append(measure("amoeba (Beast/Asio, defaults)", proc, int(ports[2])))

out = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count()}, "date": time.strftime("%Y-%m-%d"),
       "results": results}
os.makedirs(os.path.join(root, "bench/results"), exist_ok=True)
with open(os.path.join(root, "bench/results/http_transport.json"), "w") as f:
    json.dump(out, f, indent=2)


def fmt(v):
    return "timeout" if v is None else v


lines = [f"HTTP transport under attack ({out['machine']['cpu']}, {out['machine']['cores']} cores, "
         f"{out['date']}); /health in ms (median of 5, 3 s timeout)", "",
         "| server | idle | 64 slow conns | 1000 slow conns (open) | same, probe from another address "
         "| 512 MB chunked body | 64 MB of headers | exit after SIGTERM (64 slow) |",
         "|---|---|---|---|---|---|---|---|"]
for r in results:
    c, h = r["chunked_512mb"], r["headers_64mb"]
    lines.append(f"| {r['server']} | {fmt(r['idle_health_ms'])} | {fmt(r['health_ms_under_64_slow'])} | "
                 f"{fmt(r['health_ms_under_1000_slow'])} ({r['slow_connections_accepted_of_1000']}) | "
                 f"{fmt(r['health_ms_under_1000_slow_other_address'])} | "
                 f"{c['status']}, RSS +{c['rss_growth_mb']} MB | "
                 f"{h['status']}, RSS +{h['rss_growth_mb']} MB | {fmt(r['sigterm_exit_s_under_64_slow'])} s |")
md = "\n".join(lines) + "\n"
with open(os.path.join(root, "bench/results/http_transport.md"), "w") as f:
    f.write(md)
print(md)
