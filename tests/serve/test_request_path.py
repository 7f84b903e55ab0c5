"""The server's request path: preprocessing runs off the event loop, a few requests at a time, and a slow one does not
hold up the others; /debug/stages splits the time to the first token into the stages a request went through."""

from __future__ import annotations

import threading
import time

import httpx
from serve_helpers import ScriptedEngine

from qvl.serve.stages import MARKS, StageLog, stages


class SlowPrepare(ScriptedEngine):
    """Its prepare takes ``slow_s`` for a message containing 'slow', ``fast_s`` otherwise, and counts how many
    run at once."""

    def __init__(self, slow_s=3.0, fast_s=0.0, **kw):
        super().__init__("one two three four five six", **kw)
        self.slow_s, self.fast_s = slow_s, fast_s
        self.lock = threading.Lock()
        self.now = self.most = 0

    def prepare(self, request):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(self.slow_s if "slow" in str(request.messages[-1]) else self.fast_s)
            return super().prepare(request)
        finally:
            with self.lock:
                self.now -= 1


def stream(url: str, text: str) -> tuple[float, float, str]:
    """(seconds to the first content event, seconds to the end, the text) of one streamed chat completion."""
    import json

    t0, first, parts = time.perf_counter(), None, []
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"model": "scripted", "stream": True, "messages": [{"role": "user", "content": text}]}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice["delta"].get("content"):
                    first = first or time.perf_counter() - t0
                    parts.append(choice["delta"]["content"])
    return first, time.perf_counter() - t0, "".join(parts)


def test_a_slow_preprocess_does_not_delay_another_stream(serve):
    engine = SlowPrepare(slow_s=3.0, delay=0.01)
    server = serve(engine)
    slow = threading.Thread(target=stream, args=(server.url, "slow please"))
    slow.start()
    time.sleep(0.3)  # the slow one is inside its prepare
    first, end, text = stream(server.url, "quick")
    assert text == "one two three four five six"
    assert end < 1.5, f"the quick stream took {end:.2f} s behind a 3 s preprocess"
    slow.join(10)


def test_preprocessing_runs_a_few_requests_at_a_time(serve):
    """Every request is prepared, none on the event loop, at most ``preprocess_threads`` at once."""
    engine = SlowPrepare(slow_s=0.0, fast_s=0.2, delay=0.0)
    server = serve(engine, preprocess_threads=2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(stream(server.url, "hi"))) for _ in range(6)]
    for t in threads:
        t.start()
    r = httpx.get(server.url + "/health", timeout=5)  # the loop answers while they are prepared
    assert r.status_code == 200
    for t in threads:
        t.join(30)
    assert len(results) == 6 and all(text == "one two three four five six" for _, _, text in results)
    assert engine.most == 2


def test_debug_stages_split_the_time_to_the_first_token(serve):
    engine = SlowPrepare(slow_s=0.0, fast_s=0.05, delay=0.01)
    server = serve(engine)
    for _ in range(3):
        stream(server.url, "hi")
    got = httpx.get(server.url + "/debug/stages", params={"reset": "true"}, timeout=5).json()
    assert got["requests"] == 3
    s = got["stages"]
    # the scripted engine has no batcher: no 'admitted' mark, so its wait and its first token are one stage
    assert list(s) == ["arrived->read", "read->parsed", "parsed->pool", "pool->media", "media->slot", "slot->prepared",
                       "prepared->submitted", "submitted->token", "token->loop", "loop->sent", "total"]
    assert all(v["n"] == 3 for v in s.values())
    assert 50 <= s["slot->prepared"]["p50_ms"] < 1000  # the 50 ms prepare
    assert s["submitted->token"]["p50_ms"] >= 10  # the engine's first token after its 10 ms step
    parts = sum(v["mean_ms"] for k, v in s.items() if k != "total")
    assert abs(parts - s["total"]["mean_ms"]) < 1e-6 * max(1.0, parts)
    assert set(got["last"]) == {"arrived", "loop", "sent"} and got["last"]["sent"] - got["last"]["arrived"] > 0.05
    assert abs(got["last"]["arrived"] - time.perf_counter()) < 60  # one clock for the machine's processes
    assert httpx.get(server.url + "/debug/stages", timeout=5).json() == {"requests": 0, "stages": {},
                                                                          "last": {}}  # reset


def test_debug_stages_need_the_api_key(serve):
    server = serve(SlowPrepare(), api_key="k")
    assert httpx.get(server.url + "/debug/stages", timeout=5).status_code == 401
    assert httpx.get(server.url + "/debug/stages", headers={"Authorization": "Bearer k"}, timeout=5).status_code == 200


def test_stages_are_the_gaps_between_consecutive_marks():
    marks = {name: float(i) for i, name in enumerate(MARKS)}
    del marks["admitted"]
    got = stages(marks)
    assert got["submitted->token"] == 2.0 and got["total"] == len(MARKS) - 1
    assert "submitted->admitted" not in got
    log = StageLog(keep=2)
    for _ in range(3):
        log.finish("r", marks)
    assert log.summary()["requests"] == 2  # only the last ``keep``


def test_batcher_marks_when_a_request_is_admitted(tiny_engine, serve):
    """With the transformers backend's batcher, the wait for the engine and the prefill are separate stages."""
    if tiny_engine.batcher is None:
        import pytest

        pytest.skip("the tiny model runs on model.generate here")
    server = serve(tiny_engine)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "stream": True, "max_tokens": 3,
                            "messages": [{"role": "user", "content": "hi"}]}) as r:
        for _ in r.iter_lines():
            pass
    s = httpx.get(server.url + "/debug/stages", timeout=5).json()["stages"]
    assert "submitted->admitted" in s and "admitted->token" in s
