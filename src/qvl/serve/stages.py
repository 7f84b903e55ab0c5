"""Where a chat request's time goes between its arrival and its first token leaving the server.

Each request carries a few ``time.perf_counter()`` marks (a dict write each, nothing per token after the
first); the server keeps the last ``keep`` finished requests' marks and ``GET /debug/stages`` answers the
time between consecutive marks (p50 / p99 / mean, ms), and the last request's ``arrived`` and ``sent`` marks as they
are (``last``: ``time.perf_counter()`` seconds; CPython reads it from a clock the machine's processes share on Linux,
macOS and Windows, though Python does not promise it, and a container with its own time namespace differs), so a
client on the same machine can tell its own part of the time to first token from the server's. With
the ``qvl.serve`` logger at DEBUG each request's stages are also logged. The marks, in order:

========== =============================================================================================
arrived    the route's handler starts (the body not read yet)
read       the body is read
parsed     JSON parsed and validated
pool       the blocking part starts on a worker thread (``pool`` - ``parsed``: waiting for a thread)
media      images/videos fetched and decoded
slot       a preprocessing slot is free (``--preprocess-threads`` requests are preprocessed at once)
prepared   the engine's prepare returned (chat template, tokenizer, image processor, positions, hashes)
submitted  back on the event loop, handed to the engine
admitted   the engine started the prefill that includes it (transformers backend; absent on vLLM)
token      the engine emitted the first text chunk (its thread)
loop       the event loop took that chunk from the request's queue
sent       the first content event was written to the socket
========== =============================================================================================
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque

from qvl.serve.loadgen import percentile

log = logging.getLogger("qvl.serve")

MARKS = ("arrived", "read", "parsed", "pool", "media", "slot", "prepared", "submitted", "admitted", "token", "loop",
         "sent")


class Marks(dict):
    """mark name -> perf_counter seconds of one request."""

    def mark(self, name: str, at: float | None = None) -> None:
        self[name] = time.perf_counter() if at is None else at


def stages(marks: dict) -> dict[str, float]:
    """Seconds between consecutive marks present (named ``previous->next``), and ``total`` (arrived -> sent)."""
    present = [m for m in MARKS if m in marks]
    out = {f"{a}->{b}": marks[b] - marks[a] for a, b in zip(present, present[1:])}
    if "arrived" in marks and "sent" in marks:
        out["total"] = marks["sent"] - marks["arrived"]
    return out


class StageLog:
    """The stage times of the last ``keep`` streamed requests that got a first token out (the event loop's thread
    only)."""

    def __init__(self, keep: int = 4096):
        self.done: deque = deque(maxlen=keep)
        self.last: dict = {}

    def finish(self, rid: str, marks: dict) -> None:
        times = stages(marks)
        self.done.append(times)
        self.last = {k: marks[k] for k in ("arrived", "loop", "sent") if k in marks}
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s first token: %s", rid, ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))

    def summary(self) -> dict:
        """{stage: {n, mean_ms, p50_ms, p99_ms, max_ms}} over the kept requests, stages in request order."""
        names: dict[str, None] = {}
        for times in self.done:
            names.update(dict.fromkeys(times))
        out = {}
        for name in sorted(names, key=lambda n: MARKS.index(n.split("->")[0]) if "->" in n else len(MARKS)):
            v = [t[name] for t in self.done if name in t]
            out[name] = {"n": len(v), "mean_ms": statistics.fmean(v) * 1e3, "p50_ms": percentile(v, 0.5) * 1e3,
                         "p99_ms": percentile(v, 0.99) * 1e3, "max_ms": max(v) * 1e3}
        return {"requests": len(self.done), "stages": out, "last": dict(self.last)}

    def clear(self) -> None:
        self.done.clear()
        self.last = {}
