"""``qvl serve`` as a child process: started through the real CLI, ready when /health answers.

Used by ``bench/serve.py`` and the soak and fuzz tests, which must measure the server as users run
it (its own process, its own event loop), not an app object sharing the caller's interpreter.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``with ServerProcess(["--model", DIR, ...]) as server: server.url``; the log is kept in ``log_path``."""

    def __init__(self, args: list[str], port: int | None = None, log_path: str | Path | None = None,
                 startup_timeout: float = 900.0, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-c", "from qvl.cli.main import main; main()", "serve",
                        "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, **(env or {})}
        # the child imports this same qvl, installed or not (a checkout run with PYTHONPATH=src, say)
        here = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (here, self.env.get("PYTHONPATH")) if p)
        self.proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> ServerProcess:
        import httpx

        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "w")
        out = self._log if self._log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qvl serve exited with {self.proc.returncode} before it was ready"
                                   + (f"; its log: {self.log_path}\n{self.tail()}" if self.log_path else ""))
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"qvl serve did not answer /health within {self.startup_timeout:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc; psutil elsewhere)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (uvicorn's graceful shutdown), then SIGKILL if it hangs; -> the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
