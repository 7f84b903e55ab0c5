"""Load for an OpenAI-compatible server, measured as ``vllm bench serve`` measures it.

Async streaming clients (``httpx``) post chat-completion requests and time every content event:

* TTFT: request sent -> first content token;
* TPOT: (last token - first token) / (completion tokens - 1), per request;
* ITL: the gaps between consecutive content events, over all requests;
* output tok/s: all completion tokens / (last response end - first request start).

Two arrival patterns: ``clients`` requests started ``stagger_s`` apart (a concurrency level), and a
Poisson process of ``rate`` requests per second. The clients are meant to run in their own process,
not the server's: in-process clients measure their contention with the server, not the server.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    ok: bool = False
    status: int = 0
    error: str | None = None
    start: float = 0.0
    encoded: float = 0.0  # when the body was encoded (JSON, as httpx's ``json=`` encodes it), after ``start``
    end: float = 0.0
    token_times: list[float] = field(default_factory=list)  # arrival time of each content event
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def tpot(self) -> float | None:
        if self.completion_tokens < 2 or len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.completion_tokens - 1)


class EngineClients:
    """In-process clients of an engine (no HTTP): one :class:`RequestResult` per request, filled from the chunks the
    engine emits (``on_chunk(i)`` is request ``i``'s callback, ``start(i)`` stamps its submission); ``wait``
    returns once every request has finished. For the engine-level rows beside the HTTP ones."""

    def __init__(self, n: int):
        import threading

        self.results = [RequestResult() for _ in range(n)]
        self._left, self._lock, self._done = n, threading.Lock(), threading.Event()

    def start(self, i: int) -> None:
        self.results[i].start = time.perf_counter()

    def on_chunk(self, i: int):
        r = self.results[i]

        def take(c) -> None:  # the engine's thread
            now = time.perf_counter()
            if c.text:
                r.token_times.append(now)
            if c.finish_reason is not None:
                r.end, r.finish_reason = now, c.finish_reason
                r.completion_tokens, r.prompt_tokens = c.completion_tokens, c.prompt_tokens
                r.ok, r.error = c.finish_reason in ("stop", "length"), c.error
                with self._lock:
                    self._left -= 1
                    if not self._left:
                        self._done.set()
        return take

    def wait(self, timeout: float = 1800.0) -> list[RequestResult]:
        self._done.wait(timeout)
        return self.results


def parse_events(lines) -> list[dict]:
    """The JSON objects of ``data:`` lines (the SSE stream of a chat completion), ``[DONE]`` left out."""
    out = []
    for line in lines:
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            out.append(json.loads(line[6:]))
    return out


async def stream_chat(client, url: str, body: dict, disconnect_after: int | None = None) -> RequestResult:
    """Post one streaming chat completion and time it. ``disconnect_after``: close after that many
    content events (a client that goes away); the result is then ``ok`` if it got them."""
    r = RequestResult(start=time.perf_counter())
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        # encoded here as httpx's json= encodes it, inside the timed window as there, so that its part is known
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
        r.encoded = time.perf_counter()
        async with client.stream("POST", url, content=content,
                                 headers={"content-type": "application/json"}) as resp:
            r.status = resp.status_code
            if resp.status_code != 200:
                r.error = (await resp.aread()).decode("utf-8", "replace")[:300]
                r.end = time.perf_counter()
                return r
            parts = []
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    r.ok = r.finish_reason is not None
                    break
                ev = json.loads(data)
                if "error" in ev:
                    r.error = ev["error"].get("message", "error event")
                    break
                if ev.get("usage"):
                    r.completion_tokens = ev["usage"]["completion_tokens"]
                    r.prompt_tokens = ev["usage"]["prompt_tokens"]
                for ch in ev.get("choices", []):
                    text = ch.get("delta", {}).get("content")
                    if text:
                        r.token_times.append(time.perf_counter())
                        parts.append(text)
                    r.finish_reason = ch.get("finish_reason") or r.finish_reason
                if disconnect_after is not None and len(r.token_times) >= disconnect_after:
                    r.ok = True
                    break
            r.text = "".join(parts)
    except Exception as e:  # noqa: BLE001 - a failed request is a result (counted as an error), not a crash
        r.error = f"{type(e).__name__}: {e}"
    r.end = time.perf_counter()
    return r


def _client(timeout: float):
    import httpx

    return httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None,
                                                                 max_keepalive_connections=None))


async def run_staggered(url: str, bodies: list[dict], stagger_s: float, timeout: float = 600.0) -> list[RequestResult]:
    """One request per body, the i-th started ``i * stagger_s`` after the first."""
    async with _client(timeout) as client:
        t0 = time.perf_counter()

        async def one(i, body):
            await asyncio.sleep(max(0.0, t0 + i * stagger_s - time.perf_counter()))
            return await stream_chat(client, url, body)

        return list(await asyncio.gather(*(one(i, b) for i, b in enumerate(bodies))))


async def run_poisson(url: str, bodies: list[dict], rate: float, seed: int = 0,
                      timeout: float = 600.0) -> list[RequestResult]:
    """One request per body, arrivals a Poisson process of ``rate`` requests per second."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in bodies:
        offsets.append(t)
        t += rng.expovariate(rate)
    async with _client(timeout) as client:
        t0 = time.perf_counter()

        async def one(offset, body):
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            return await stream_chat(client, url, body)

        return list(await asyncio.gather(*(one(o, b) for o, b in zip(offsets, bodies))))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarize(results: list[RequestResult]) -> dict:
    """Output tok/s, TTFT / TPOT / ITL (mean, p50, p99; seconds), errors of one load run."""
    good = [r for r in results if r.ok]
    ttft = [r.ttft for r in good if r.ttft is not None]
    tpot = [r.tpot for r in good if r.tpot is not None]
    itl = [b - a for r in good for a, b in zip(r.token_times, r.token_times[1:])]
    tokens = sum(r.completion_tokens for r in good)
    wall = (max(r.end for r in results) - min(r.start for r in results)) if results else 0.0
    out = {"requests": len(results), "completed": len(good), "errors": len(results) - len(good),
           "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall if wall else 0.0,
           "per_stream_tok_s_p50": percentile([1 / t for t in tpot if t > 0], 0.5)}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        out[f"{name}_mean_s"] = statistics.fmean(values) if values else None
        out[f"{name}_p50_s"] = percentile(values, 0.5)
        out[f"{name}_p99_s"] = percentile(values, 0.99)
    out["ttft_max_s"] = max(ttft) if ttft else None
    first_errors = sorted({r.error or f"HTTP {r.status}" for r in results if not r.ok})[:3]
    if first_errors:
        out["error_examples"] = first_errors
    return out
