"""server.py in a subprocess: the one way benchmarks and tests start a real server.

    with ServerProcess(["--mode", "disagg"], log=Path("out/server.log")) as srv:   # or `async with`
        ... srv.url ...

start() runs `python server.py --port PORT FLAGS...` from the repository root on a free port (or the one
given), its stdout and stderr to `log` (the command line first), and returns once GET /health answers 200;
it raises, with the log's tail, if the server exits or is not healthy in time. stop() sends SIGTERM (the
server drains what is in flight) and kills it if it has not exited after `stop_timeout` seconds.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, flags: list[str], log: str | Path, port: int | None = None, host: str = "127.0.0.1",
                 env: dict[str, str] | None = None, startup_timeout: float = 300.0,
                 stop_timeout: float = 60.0) -> None:
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.cmd = [sys.executable, str(ROOT / "server.py"), "--host", host, "--port", str(self.port), *flags]
        self.log = Path(log)
        self.env = {**os.environ, **(env or {})}
        self.startup_timeout, self.stop_timeout = startup_timeout, stop_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as f:
            f.write(" ".join(self.cmd) + "\n")
            f.flush()
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self._tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not healthy after {self.startup_timeout:g} s: {self._tail()}")
            time.sleep(0.25)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return r.status == 200
        except OSError:  # refused while starting, or 503 while draining
            return False

    def stop(self) -> int | None:
        """SIGTERM, then kill after stop_timeout; the exit status (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def _tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return f"see {self.log}; last lines:\n" + "\n".join(text)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> ServerProcess:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
