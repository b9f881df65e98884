"""Helpers the Python tests share: a tiny calibrated supernet made with amoeba-admin, and an
amoeba-server process on free loopback ports (read back from --port-file)."""
import os
import signal
import subprocess
import sys
import time


def run(*cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def make_supernet(admin, d, seed):
    """A 5-layer tiny model calibrated into the supernet f"{d}/s"; returns its path."""
    run(admin, "init", "--out", f"{d}/m", "--preset", "tiny", "--layers", "5", "--seed", str(seed))
    with open(f"{d}/calib.txt", "w") as f:
        f.write("the quick brown fox jumps over the lazy dog. " * 100)
    run(admin, "calibrate", "--model", f"{d}/m", "--data", f"{d}/calib.txt", "--out", f"{d}/s",
        "--windows", "4", "--window-len", "32", "--dp-windows", "2")
    return f"{d}/s"


def start_server(server_bin, supernet, d, *args, stderr=None):
    """Starts amoeba-server on 127.0.0.1 with any free ports; returns (process, [grpc, metrics,
    http] ports as strings). Its log goes to `stderr` (a file), by default {d}/server.log: never
    a pipe, which nobody reads and which blocks the server once full."""
    if stderr is None:
        stderr = open(f"{d}/server.log", "a")
    port_file = f"{d}/ports"
    if os.path.exists(port_file):
        os.remove(port_file)
    metrics = [] if "--metrics-port" in args else ["--metrics-port", "-1"]
    proc = subprocess.Popen([server_bin, "--supernet", supernet, "--host", "127.0.0.1", "--port", "0",
                             *metrics, "--port-file", port_file, *args],
                            stdout=subprocess.DEVNULL, stderr=stderr)
    for _ in range(600):
        if os.path.exists(port_file):
            return proc, open(port_file).read().split()
        if proc.poll() is not None:
            err = open(stderr.name).read()[-2000:] if hasattr(stderr, "name") else ""
            sys.exit(f"FAIL: server exited with {proc.returncode} before listening: {err}")
        time.sleep(0.1)
    proc.kill()
    sys.exit("FAIL: server did not start within 60 s")


def stop_server(proc, timeout=30):
    """SIGTERM, then a clean exit within `timeout` seconds or the test fails."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        sys.exit(f"FAIL: server did not stop within {timeout} s of SIGTERM")
    if proc.returncode != 0:
        sys.exit(f"FAIL: server exit code {proc.returncode}")
