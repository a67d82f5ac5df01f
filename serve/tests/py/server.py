"""Starts a vet-serve binary on fixtures/tiny on a free loopback port, for the Python tests."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(bin, *args) as s:` runs vet-serve until the block ends; `s.url` is its root."""

    def __init__(self, binary, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [binary, "--model", os.path.join(ROOT, "fixtures", "tiny"), "--model-name", "tiny",
               "--port", str(self.port), "--threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)

    def __enter__(self):
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"vet-serve exited: {self.proc.stderr.read()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        return self
            except OSError:
                time.sleep(0.2)
        self.proc.kill()
        sys.exit("vet-serve did not come up within 60 s")

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
