"""Where the server's threads spend a window of time: CPU seconds per thread and the functions they were seen in.

The HTTP path under load loses to the engine alone by what its threads take from one another: at 32 clients on an
H200 (2026-12-05, bench/results/serve.json) a request waited 81 ms (p50) for a preprocessing slot and 250 ms for
the engine to admit it, against 0.14 s for the whole time to first token in the engine alone. The event loop, the
preprocessing threads and the engine's thread share one interpreter, so what matters is which thread holds it and
doing what. ``POST /debug/threads`` starts a window; ``GET /debug/threads`` ends it and answers, for each thread,
its CPU seconds in the window (Linux: ``/proc/self/task/TID/stat``; a thread running Python holds the interpreter
lock, so a thread's CPU time bounds its lock time from above) and the functions its stack was seen in, sampled
every ``interval`` s (the innermost frame, and the innermost frame of qvl's own code). Sampling holds the
interpreter a little itself (walking ~50 threads' stacks every 10 ms), so it is off unless a window is open, and a
window left open stops sampling after ``max_seconds``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path


def cpu_seconds(native_id: int) -> float | None:
    """User + system CPU seconds of this process's thread ``native_id`` so far (None where /proc has no answer)."""
    try:
        stat = Path(f"/proc/self/task/{native_id}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


_QVL_DIR = str(Path(__file__).resolve().parents[1])  # qvl's own code: src/qvl
_labels: dict = {}  # code object -> ("file.py:function", whether it is qvl's)


def _label(code) -> tuple[str, bool]:
    got = _labels.get(code)
    if got is None:
        got = _labels[code] = (f"{Path(code.co_filename).name}:{code.co_name}",
                               code.co_filename.startswith(_QVL_DIR))
    return got


def _where(frame, depth: int = 40) -> tuple[str, str]:
    """(innermost frame, innermost frame in qvl's code within ``depth`` frames) as "file.py:function"."""
    inner = _label(frame.f_code)[0]
    while frame is not None and depth:
        label, own = _label(frame.f_code)
        if own:
            return inner, label
        frame, depth = frame.f_back, depth - 1
    return inner, ""


class ThreadSampler:
    """``start()`` opens a window, ``stop()`` closes it and returns the summary (see the module's notes)."""

    def __init__(self, interval: float = 0.01, top: int = 6, max_seconds: float = 300.0):
        self.interval, self.top, self.max_seconds = interval, top, max_seconds
        self._lock = threading.Lock()
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Open a window (an open one is closed and forgotten)."""
        self.stop()
        with self._lock:
            self._t0 = time.perf_counter()
            self._cpu0 = {(t.ident, t.native_id): cpu_seconds(t.native_id) for t in threading.enumerate()}
            self._end = None  # (time, {thread: CPU seconds}) when the window ran out before stop()
            self._samples = 0
            self._seen: dict[int, tuple[Counter, Counter]] = {}
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="qvl-thread-sampler", daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            if time.perf_counter() - self._t0 > self.max_seconds:  # left open: the window ends here
                with self._lock:
                    self._end = (time.perf_counter(), {(t.ident, t.native_id): cpu_seconds(t.native_id)
                                                       for t in threading.enumerate()})
                return
            frames = sys._current_frames()
            with self._lock:
                self._samples += 1
                for ident, frame in frames.items():
                    if ident == me:
                        continue
                    inner, own = _where(frame)
                    counts = self._seen.setdefault(ident, (Counter(), Counter()))
                    counts[0][inner] += 1
                    if own:
                        counts[1][own] += 1

    def stop(self) -> dict:
        """Close the window; -> {"seconds", "samples", "threads": [{"name", "cpu_s", "cpu_share", "in",
        "in_qvl"}, ...] busiest first} ({} when none was open). ``in`` / ``in_qvl``: [function, share of the
        samples] most seen first; ``cpu_share``: CPU seconds over the window's length (None without /proc)."""
        if self._thread is None:
            return {}
        self._stop.set()
        self._thread.join()
        with self._lock:
            end, cpu_end = self._end or (time.perf_counter(), None)
            seconds = end - self._t0
            samples = max(self._samples, 1)
            threads = []
            for t in threading.enumerate():
                if t is self._thread:
                    continue
                key = (t.ident, t.native_id)
                now = cpu_end.get(key) if cpu_end is not None else cpu_seconds(t.native_id)
                cpu = None if now is None else max(now - (self._cpu0.get(key) or 0.0), 0.0)
                inner, own = self._seen.get(t.ident, (Counter(), Counter()))
                threads.append({
                    "name": t.name, "cpu_s": cpu, "cpu_share": None if cpu is None else cpu / seconds,
                    "in": [[f, round(n / samples, 3)] for f, n in inner.most_common(self.top)],
                    "in_qvl": [[f, round(n / samples, 3)] for f, n in own.most_common(self.top)]})
            self._thread = None
        threads.sort(key=lambda t: -(t["cpu_s"] or 0.0))
        return {"seconds": seconds, "samples": self._samples, "threads": threads}
