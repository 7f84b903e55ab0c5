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


class _CharTok:
    """One token per character (id = code point); 0 is EOS."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _row(stop=(), max_new=50):
    from qvl.infer.engine import Prepared
    from qvl.infer.transformers_backend import _Job, _Row
    from qvl.infer.types import Handle, SamplingParams

    prepared = Prepared(None, SamplingParams(stop=tuple(stop), max_new_tokens=max_new), 3, None)
    handle = Handle(3)
    return _Row(_Job(prepared, handle), _CharTok(), {0}, ""), handle


def _drain(handle):
    chunks = []
    while not handle._queue.empty():
        chunks.append(handle._queue.get())
    return chunks


@pytest.mark.parametrize("text,stop,want,finish", [
    ("abcENDxyz", ["END"], "abc", "stop"),  # stop split over three tokens: none of it is streamed
    ("abENxENDz", ["END"], "abENx", "stop"),  # a false start is sent once it cannot be a stop any more
    ("abEN", ["END"], "abEN", "length"),  # text held back at the end is flushed
    ("a\nbEND", ["\nbE", "ND"], "a", "stop"),  # the earliest stop wins, across a newline
])
def test_stop_string_split_over_tokens(text, stop, want, finish):
    row, handle = _row(stop, max_new=len(text))
    sent = []
    for ch in text:
        row.push(ord(ch))
        sent += [c.text for c in _drain(handle) if c.text]
        assert stop[0] not in "".join(sent)
        if row.finish:
            break
    row.close()
    chunks = _drain(handle)
    streamed = "".join(sent + [c.text for c in chunks if c.text])
    assert streamed == want and chunks[-1].finish_reason == finish


def test_eos_flushes_held_text():
    row, handle = _row(["END"])
    for ch in "okE":
        row.push(ord(ch))
    row.push(0)  # EOS
    row.close()
    chunks = _drain(handle)
    assert "".join(c.text for c in chunks) == "okE" and chunks[-1].finish_reason == "stop"
    assert chunks[-1].completion_tokens == 4


def test_jobs_set_aside_are_batched_together(tiny):
    """A(k1) B(k2) C(k2) waiting: A runs, then B and C as one batch (C was not left to run alone)."""
    from qvl.infer.engine import Prepared
    from qvl.infer.types import SamplingParams

    e = TransformersEngine(*tiny, name="tiny", fast=False)  # the model.generate path batches by sampling key
    gate, batches, done = threading.Event(), [], threading.Event()

    def fake_generate(jobs):
        gate.wait(10)
        batches.append([j.prepared.sampling.temperature for j in jobs])
        if sum(map(len, batches)) == 4:
            done.set()

    def job(t):
        return Prepared(None, SamplingParams(temperature=t), 1, None)

    e._generate = fake_generate
    e.submit(job(0.1))  # blocks the worker
    import time

    time.sleep(0.2)
    for t in (0.5, 0.9, 0.9):
        e.submit(job(t))
    gate.set()
    assert done.wait(10)
    e.close()
    assert batches == [[0.1], [0.5], [0.9, 0.9]]


def test_tiny_temperature_is_greedy(engine):
    """temperature 1e-300 divided the logits into inf: 'probability tensor contains inf' (a 500 in serve)."""
    greedy = engine.generate(ask(engine, max_new_tokens=6, temperature=0))
    tiny_t = engine.generate(ask(engine, max_new_tokens=6, temperature=1e-300))
    assert tiny_t.text == greedy.text and tiny_t.finish_reason == greedy.finish_reason


def _stream_ids(tokenizer, ids):
    from qvl.infer.engine import Prepared
    from qvl.infer.transformers_backend import _Job, _Row
    from qvl.infer.types import Handle, SamplingParams

    handle = Handle(1)
    row = _Row(_Job(Prepared(None, SamplingParams(max_new_tokens=10**6), 1, None), handle), tokenizer, set(), "")
    sent = []
    for token in ids:
        row.push(token)
        sent += [c.text for c in _drain(handle) if c.text]
    row.close()
    return sent + [c.text for c in _drain(handle) if c.text]


def test_incremental_detokenisation_equals_decoding_everything(tiny_processor):
    """The streamed pieces join to exactly ``tokenizer.decode(all ids)``: random ids (special ones, lone UTF-8
    bytes, anything), byte tokens that build multi-byte characters, and real multilingual text."""
    import random

    tok = tiny_processor.tokenizer
    rng = random.Random(0)
    texts = ["The quick brown fox.\nNew line — ümlaut, 日本語のテキスト, emoji 🙂🎉 and 한국어.\n\n  spaces  ",
             '{"bbox_2d": [12, 40, 300, 512], "label": "cat"}', "ab\u200dcd\ufffd"]
    seqs = [tok.encode(t) for t in texts]
    seqs += [[rng.randrange(len(tok)) for _ in range(rng.randrange(1, 60))] for _ in range(150)]
    seqs += [[rng.randrange(256) for _ in range(rng.randrange(1, 40))] for _ in range(150)]  # byte tokens
    for ids in seqs:
        pieces = _stream_ids(tok, ids)
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True), ids
    pieces = _stream_ids(tok, tok.encode(texts[1]))
    assert len(pieces) >= len(tok.encode(texts[1])) // 2  # streamed as it goes, not at the end


def test_an_engine_used_as_a_context_manager_stops_its_worker_on_leaving(tiny):
    with TransformersEngine(*tiny, name="tiny") as e:
        assert e.generate(ask(e, max_new_tokens=2, temperature=0)).completion_tokens == 2
        worker = e._worker
        assert worker.is_alive()
    assert not worker.is_alive()
    with pytest.raises(Exception, match="closed"):
        e.submit(e.prepare(ask(e, max_new_tokens=2)))
