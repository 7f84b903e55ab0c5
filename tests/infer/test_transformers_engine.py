"""The transformers backend on the tiny model: token streaming, batching, stops, cancel, limits."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from qvl.data.samples import Media, Message
from qvl.infer.engine import RequestError
from qvl.infer.transformers_backend import TransformersEngine
from qvl.infer.types import Request


@pytest.fixture(scope="module")
def engine(tiny):
    e = TransformersEngine(*tiny, name="tiny")
    yield e
    e.close()


def ask(engine, text="hello", image=None, **sampling):
    parts = ([Media("image", image)] if image is not None else []) + [text]
    return Request([Message("user", parts)], engine.sampling(**sampling))


def test_streams_token_by_token(engine):
    chunks = list(engine.stream(ask(engine, image=Image.new("RGB", (64, 64), "red"), max_new_tokens=10,
                                    temperature=0)))
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 10
    assert len([c for c in chunks if c.text]) >= 5  # not one blob at the end
    text_only = engine.prepare(ask(engine, max_new_tokens=10)).prompt_tokens
    assert chunks[-1].prompt_tokens > text_only + 3  # image tokens counted


def test_greedy_is_deterministic_and_batch_matches_single(engine):
    single = engine.generate(ask(engine, "red circle", max_new_tokens=8, temperature=0)).text
    handles = [engine.stream(ask(engine, t, max_new_tokens=8, temperature=0))
               for t in ("red circle", "a much longer prompt about the blue square", "red circle")]
    texts = [h.result().text for h in handles]
    assert texts[0] == single and texts[2] == single


def test_seed_reproducible(engine):
    a = engine.generate(ask(engine, max_new_tokens=8, seed=3, temperature=1.0)).text
    b = engine.generate(ask(engine, max_new_tokens=8, seed=3, temperature=1.0)).text
    assert a == b


def test_stop_string(engine):
    full = engine.generate(ask(engine, max_new_tokens=12, temperature=0)).text
    stop = full[4:7]
    if not stop.strip():
        pytest.skip("greedy text has no usable stop string")
    r = engine.generate(ask(engine, max_new_tokens=12, temperature=0, stop=[stop]))
    assert r.finish_reason == "stop" and stop not in r.text and full.startswith(r.text)


def test_cancel(engine):
    handle = engine.stream(ask(engine, max_new_tokens=2000, temperature=0.7))
    got = []
    for c in handle:
        got.append(c)
        if len(got) == 3:
            handle.cancel()
    assert got[-1].finish_reason == "cancelled" and got[-1].completion_tokens < 100


def test_context_limit_and_clipping(tiny):
    e = TransformersEngine(*tiny, name="tiny", max_model_len=40)
    try:
        with pytest.raises(RequestError) as err:
            e.prepare(ask(e, "red " * 60))
        assert err.value.code == "context_length_exceeded"
        p = e.prepare(ask(e, "hi", max_new_tokens=1000))
        assert p.sampling.max_new_tokens == 40 - p.prompt_tokens
    finally:
        e.close()


def test_bad_media_is_request_error(engine):
    with pytest.raises(RequestError) as err:
        engine.prepare(ask(engine, image="/nonexistent.png"))
    assert err.value.code == "invalid_media"


def test_concurrent_submitters(engine):
    out = {}

    def run(i):
        out[i] = engine.generate(ask(engine, f"prompt {i}", max_new_tokens=6 + i, temperature=0))

    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert sorted(out) == [0, 1, 2, 3]
    assert all(out[i].completion_tokens == 6 + i for i in out)
