"""Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON
messages ending in NUL on fds 3 and 4), so a test waits for a page in real time.

Why not --dump-dom with --virtual-time-budget: virtual time only holds while a fetch waits for its
headers; a streamed body (server-sent events) is read after virtual time has already run out, so
the page was dumped before the generation had streamed in (most runs on Chromium 156).
"""
import base64
import fcntl
import json
import os
import subprocess
import time


class Browser:
    def __init__(self, width=1200, height=1150):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def to_fds_3_and_4():  # in the child: Chromium reads commands on fd 3, writes on fd 4
            r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)  # above 4, so dup2 cannot be a no-op
            w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
            os.dup2(r, 3)
            os.dup2(w, 4)

        self._proc = subprocess.Popen(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(3, 4, to_chrome_r, from_chrome_w), preexec_fn=to_fds_3_and_4)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._next_id = 0
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self._session = self.call("Target.attachToTarget", targetId=page["targetId"],
                                  flatten=True)["sessionId"]

    def call(self, method, session=None, timeout=30, **params):
        """Sends one command and returns its result (raises on a protocol error)."""
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buf:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no reply to {method} within {timeout} s")
                chunk = os.read(self._from_chrome, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe during {method}")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") != self._next_id:
                continue  # an event, or a reply to nothing we wait for
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

    def page(self, method, **params):
        return self.call(method, session=self._session, **params)

    def navigate(self, url):
        self.page("Page.navigate", url=url)

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (None while it cannot be evaluated)."""
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def wait_for(self, expression, timeout):
        """Polls `expression` until it is truthy or `timeout` real seconds pass; returns it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        return None

    def screenshot(self, path):
        data = self.page("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
