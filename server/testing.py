"""``ServerProcess``: run ``csps serve`` as a subprocess on a free port (tests and benchmarks).

    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", "1024"]) as srv:
        httpx.get(srv.url + "/health")

The server picks its own port (``--port 0``) and logs it; its log is collected in ``srv.log``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx

LISTEN_RE = re.compile(r"csps API listening on (http://\S+?);")


READY_LINE = "csps serving "  # the line ``csps serve`` logs once its engine is up (server/run.py)


class ServerProcess:
    def __init__(self, args: list[str], wait_ready: bool = True, timeout_s: float = 300.0,
                 env: dict[str, str] | None = None, launcher: list[str] | None = None) -> None:
        """``launcher``: what runs ``-m csps.cli serve`` (default this Python; e.g. torchrun's command)."""
        self.args = list(args)
        self.launcher = list(launcher or [sys.executable])
        self.wait_ready = wait_ready
        self.timeout_s = timeout_s
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.url: str | None = None
        self.proc: subprocess.Popen | None = None
        self._listening = threading.Event()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = LISTEN_RE.search(line)
            if m and self.url is None:
                self.url = m.group(1)
                self._listening.set()
        self._listening.set()  # the process ended

    def start(self) -> ServerProcess:
        cmd = [*self.launcher, "-m", "csps.cli", "serve", "--port", "0", *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._listening.wait(self.timeout_s) or self.url is None:
            self.stop()
            raise RuntimeError(f"csps serve did not start listening:\n{self.log}")
        if self.wait_ready:
            self.wait_until_ready()
        return self

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"csps serve exited with code {self.proc.returncode}:\n{self.log}")
            try:
                r = httpx.get(self.url + "/health", timeout=5.0)
                if r.status_code == 200 and READY_LINE in self.log:  # ready, and said so in its log
                    return
                if r.json().get("status") == "dead":
                    raise RuntimeError(f"the engine died while starting:\n{self.log}")
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the engine did not become ready in {self.timeout_s} s:\n{self.log}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout_s)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
