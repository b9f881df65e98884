"""Slow HTTP clients (the "slowloris" attack) for tests/http_attack_test.py and
bench/http_transport.py: connections that send a request head one byte at a time."""
import socket
import threading


class SlowClients:
    """n connections that send a request head one byte every `every` seconds."""

    def __init__(self, port, n, every=0.2):
        self.socks = []
        self.stop = threading.Event()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 4096
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
                s.sendall(head[:40])
                self.socks.append(s)
            except OSError:  # refused past the server's connection caps
                pass
        self.thread = threading.Thread(target=self.drip, args=(head[40:], every), daemon=True)
        self.thread.start()

    def drip(self, rest, every):
        for i in range(len(rest)):
            if self.stop.wait(every):
                return
            for s in self.socks:
                try:
                    s.send(rest[i:i + 1])
                except OSError:
                    pass

    def open_count(self):
        """Connections the server has not closed yet."""
        n = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                n += s.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                n += 1
            except OSError:
                pass
        return n

    def close(self):
        self.stop.set()
        self.thread.join()
        for s in self.socks:
            s.close()
