"""`qvl serve` in a child process, as a user starts it (used by the vLLM tests and compare_backends.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "serve"))  # serve_helpers: free_port, media
from serve_helpers import free_port  # noqa: E402

QVL = str(Path(sys.executable).with_name("qvl"))  # the console script of the environment running this


class QvlServer:
    """`qvl serve ARGS` in its own process group (vLLM starts engine processes under it); ready when
    /health answers; stopped with the whole group. ``log`` is everything it printed."""

    def __init__(self, args: list[str], log_path: Path, env: dict | None = None, timeout: float = 600):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [QVL, "serve", *[a.replace("{port}", str(self.port)) for a in args]]
        self.log_path = log_path
        started = time.perf_counter()
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{' '.join(self.args)} exited with {self.proc.returncode}:\n{self.log[-6000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() - started > timeout:
                self.stop()
                raise RuntimeError(f"{' '.join(self.args)} not ready after {timeout:.0f} s:\n{self.log[-6000:]}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - started

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
