"""The fast decode path and continuous batching on the tiny model (CPU, eager).

Equivalence: greedy tokens identical to ``model.generate`` for text, image and video prompts;
a request's output does not depend on which requests run beside it, or when they join or leave.
Scheduler: joins between steps, leaves free their slot for the next request, cancellation.
"""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from qvl.data.preprocess import encode
from qvl.data.samples import Media, Message, Sample
from qvl.infer.continuous import ContinuousBatcher
from qvl.infer.decode import DecodeModel, supports
from qvl.infer.engine import Prepared
from qvl.infer.sampler import TokenStats, choose
from qvl.infer.transformers_backend import PresencePenalty, TransformersEngine, _Job, cache_shape
from qvl.infer.types import Handle, SamplingParams

GREEDY = SamplingParams(temperature=0.0, presence_penalty=0.0, max_new_tokens=24, ignore_eos=True)


def _video():
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from helpers import write_video

    return str(write_video(Path(tempfile.mkdtemp()) / "clip.mp4", frames=8, fps=4))


PROMPTS = {
    "text": ["describe the red circle in detail"],
    "image": [Media("image", Image.new("RGB", (96, 64), "blue")), "what shape is this?"],
    "two_images": [Media("image", Image.new("RGB", (64, 64), "red")),
                   Media("image", Image.new("RGB", (32, 64), "green")), "compare"],
    "video": [Media("video", _video()), "what happens?"],
}


def _encode(processor, parts):
    return encode(Sample([Message("user", parts)]), processor, for_generation=True)


def _generate_ids(model, processor, enc, n):
    from qvl.data.collate import collate
    from qvl.models.tokens import token_ids

    batch = collate([enc], pad_id=token_ids(processor.tokenizer).pad, padding_side="left")
    out = model.generate(**batch, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=token_ids(processor.tokenizer).pad)
    return out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def fast(tiny):
    model, processor = tiny
    from qvl.data.packing import rope_index_fn
    from qvl.models.tokens import token_ids

    decoder = DecodeModel(model, slots=4, max_len=512)
    return decoder, processor, token_ids(processor.tokenizer).pad, rope_index_fn(model)


def _batcher(fast, make_row):
    decoder, processor, pad, rope = fast
    return ContinuousBatcher(decoder, make_row, pad, rope, coalesce_s=0.0)


class _Collect:
    """A _Row stand-in that records token ids and stops after max_new_tokens (or when cancelled)."""

    def __init__(self, job):
        self.job, self.tokens, self.finish = job, [], None

    def push(self, token):
        self.tokens.append(token)
        if self.job.handle.cancelled:
            self.finish = "cancelled"
        elif len(self.tokens) >= self.job.prepared.sampling.max_new_tokens:
            self.finish = "length"

    def close(self):
        self.job.handle.emit_tokens = self.tokens


def _job(processor, parts, sampling=GREEDY):
    enc = _encode(processor, parts)
    return _Job(Prepared(None, sampling, len(enc), enc), Handle(len(enc)))


def _run_until_done(b, jobs_by_step: dict[int, list]):
    """Drive the batcher by hand: at decode step k, the jobs of jobs_by_step[k] arrive."""
    k = 0
    while True:
        for job in jobs_by_step.get(k, []):
            b.submit(job)
        b.turn()
        if not b.running and not b.waiting and b.inflight is None and b.in_parts is None and k >= max(jobs_by_step):
            return
        k += 1


@pytest.mark.parametrize("impl", ["packed", "padded"])
@pytest.mark.parametrize("kind", list(PROMPTS))
def test_greedy_matches_generate(tiny, fast, kind, impl, monkeypatch):
    model, processor = tiny
    monkeypatch.setattr(fast[0], "prefill_impl", impl)
    job = _job(processor, PROMPTS[kind])
    want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    b = _batcher(fast, _Collect)
    _run_until_done(b, {0: [job]})
    assert job.handle.emit_tokens == want


def test_batching_does_not_change_outputs(tiny, fast):
    """Four requests joining at different steps (and one leaving early) produce what each produces alone."""
    _, processor = tiny
    alone = {}
    for kind, parts in PROMPTS.items():
        job = _job(processor, parts)
        _run_until_done(_batcher(fast, _Collect), {0: [job]})
        alone[kind] = job.handle.emit_tokens
    b = _batcher(fast, _Collect)
    jobs = {kind: _job(processor, parts) for kind, parts in PROMPTS.items()}
    short = _job(processor, ["short one"], GREEDY.replace(max_new_tokens=3))
    _run_until_done(b, {0: [jobs["text"], short], 2: [jobs["image"]], 5: [jobs["video"], jobs["two_images"]]})
    for kind, job in jobs.items():
        assert job.handle.emit_tokens == alone[kind], kind
    assert len(short.handle.emit_tokens) == 3


def test_slots_are_reused_and_joins_happen_between_steps(tiny, fast):
    _, processor = tiny
    b = _batcher(fast, _Collect)
    first = _job(processor, ["a"], GREEDY.replace(max_new_tokens=4))
    second = _job(processor, ["b"], GREEDY.replace(max_new_tokens=10))
    b.submit(first)
    b.turn()  # prefill (first token) + step 1 launched
    assert list(b.running) == [0] and len(b.running[0].row.tokens) == 1
    b.submit(second)
    b.turn()  # joins the running batch: the first request keeps its slot and its progress
    assert sorted(b.running) == [0, 1]
    assert len(b.running[0].row.tokens) == 2 and len(b.running[1].row.tokens) == 1
    while 0 in b.running:
        b.turn()
    assert first.handle.emit_tokens and len(first.handle.emit_tokens) == 4
    third = _job(processor, ["c"], GREEDY.replace(max_new_tokens=2))
    b.submit(third)
    b.turn()
    assert sorted(b.running) == [0, 1]  # the freed lowest slot is taken again
    while b.running or b.inflight:
        b.turn()
    assert fast[0].busy == set() and len(second.handle.emit_tokens) == 10 and len(third.handle.emit_tokens) == 2


def test_cancel_frees_the_slot(tiny, fast):
    _, processor = tiny
    b = _batcher(fast, _Collect)
    job = _job(processor, ["go on"], GREEDY.replace(max_new_tokens=400))
    b.submit(job)
    for _ in range(4):
        b.turn()
    job.handle.cancel()
    while b.running or b.inflight:
        b.turn()
    assert fast[0].busy == set() and 4 <= len(job.handle.emit_tokens) <= 6
    waiting = _job(processor, ["never"])
    waiting.handle.cancel()
    b.submit(waiting)
    b.turn()
    assert not b.running and not b.waiting


def test_engine_streams_and_runs_the_worker_loop(tiny):
    """Through the engine's thread and queue: concurrent requests, a stop string, and close()."""
    from qvl.data.samples import Message as M
    from qvl.infer.types import Request

    e = TransformersEngine(*tiny, name="tiny", fast=True, max_batch_size=4)
    try:
        assert e.batcher is not None and "continuous batching" in e.describe()
        reqs = [Request([M("user", [f"prompt {i}"])], e.sampling(temperature=0, max_new_tokens=5 + i))
                for i in range(6)]  # more requests than slots: the last ones wait for a free slot
        handles = [e.stream(r) for r in reqs]
        results = [h.result() for h in handles]
        assert [r.completion_tokens for r in results] == [5 + i for i in range(6)]
        alone = e.generate(reqs[3])
        assert alone.text == results[3].text
        assert e.batcher.steps > 0
    finally:
        e.close()


def test_close_under_running_requests_ends_their_streams_cleanly(tiny, caplog):
    """close() while a request decodes: the step in flight is collected and the stream ends "cancelled".
    (The shutdown path once called ``_collect()`` without its step: a TypeError logged as a failed generation.)"""
    import logging
    import time

    from qvl.data.samples import Message as M
    from qvl.infer.types import Request

    e = TransformersEngine(*tiny, name="tiny", fast=True, max_batch_size=2)
    handle = e.stream(Request([M("user", ["go on"])], e.sampling(temperature=0, max_new_tokens=100_000,
                                                                   ignore_eos=True)))
    deadline = time.time() + 60
    while e.batcher.steps < 3 and time.time() < deadline:
        time.sleep(0.01)
    with caplog.at_level(logging.ERROR, logger="qvl.infer"):
        e.close()
        e._worker.join(timeout=60)
        chunks = list(handle)
    assert not e._worker.is_alive()
    assert chunks[-1].finish_reason == "cancelled" and chunks[-1].error is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_ignore_eos_and_fallback_reason(tiny):
    model, _ = tiny
    assert supports(model) is None
    import copy

    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"]))
    assert "adapter" in supports(wrapped)


def test_cache_shape_plans_slots_and_length(tiny):
    model, _ = tiny
    per_token = DecodeModel.cache_bytes_per_token(model)
    gib = 2**30
    slots, length = cache_shape(model, 8, 32768, kv_cache_gib=8 * 8192 * per_token / gib)
    assert (slots, length) == (8, 8192)  # 8 slots x 8k fit; the full 32k context would not
    slots, length = cache_shape(model, 8, 32768, kv_cache_gib=2 * 8192 * per_token / gib)
    assert slots == 2 and length == 8192  # fewer slots rather than a context under 8k
    assert cache_shape(model, 4, 300, kv_cache_gib=1.0) == (4, 300)
    from qvl.errors import QvlError

    with pytest.raises(QvlError, match="KV cache"):
        cache_shape(model, 1, 32768, kv_cache_gib=10 * per_token / gib)


# ---------------------------------------------------------------------------- sampling


def _choose(logits, slots, params, stats, generators=None):
    from qvl.infer.sampler import row_params

    gens = generators or [None] * len(slots)
    return choose(logits, row_params(slots, params, gens, logits.shape[1], "cpu"), stats)


def test_choose_greedy_with_presence_penalty_matches_the_processor():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    stats = TokenStats(4, 50, "cpu")
    params = [SamplingParams(temperature=0, presence_penalty=1.5, frequency_penalty=0.5)] * 3
    history = {0: [], 1: [7, 7, 9], 2: [3]}
    for slot, ids in history.items():
        stats.start(slot, [1, 2], params[0])
        for t in ids:
            stats.add(torch.tensor([slot]), torch.tensor([t]))
    got = _choose(logits.clone(), [0, 1, 2], params, stats)
    for row, ids in history.items():
        seq = torch.tensor([[1, 2] + ids])
        want = PresencePenalty(2, 1.5, 0.5)(seq, logits[row:row + 1].clone()).argmax(-1)
        assert int(got[row]) == int(want)


def test_choose_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(1, 30)
    s = SamplingParams(temperature=0, presence_penalty=0, repetition_penalty=1.3)
    stats = TokenStats(1, 30, "cpu")
    prompt = [int(logits.argmax()), 5]  # the best token is in the prompt: the penalty must move it
    stats.start(0, prompt, s)
    got = _choose(logits.clone(), [0], [s], stats)
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt]), logits.clone()).argmax(-1)
    assert int(got[0]) == int(want)


def test_top_k_one_and_tiny_top_p_are_greedy_and_seeds_are_per_row():
    torch.manual_seed(2)
    logits = torch.randn(4, 100)
    stats = TokenStats(4, 100, "cpu")
    greedy = logits.argmax(-1)
    k1 = [SamplingParams(temperature=1.0, top_k=1, presence_penalty=0)] * 4
    assert torch.equal(_choose(logits, [0, 1, 2, 3], k1, stats), greedy)
    p0 = [SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, presence_penalty=0)] * 4
    assert torch.equal(_choose(logits, [0, 1, 2, 3], p0, stats), greedy)
    mixed = [SamplingParams(temperature=0), SamplingParams(temperature=1.0, top_k=1)] * 2
    assert torch.equal(_choose(logits, [0, 1, 2, 3], mixed, stats), greedy)
    hot = SamplingParams(temperature=2.0, top_k=0, top_p=1.0, presence_penalty=0)

    def seeded_row(companions):
        gens = [torch.Generator().manual_seed(5)] + [None] * companions
        out = []
        for _ in range(20):
            out.append(int(_choose(logits[:companions + 1], list(range(companions + 1)), [hot] * (companions + 1),
                                   stats, gens)[0]))
        return out

    assert seeded_row(0) == seeded_row(3)  # the seeded row's draws ignore its batch companions
    assert len(set(seeded_row(0))) > 3  # and it does sample


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    stats = TokenStats(1, 4, "cpu")
    s = SamplingParams(temperature=1.0, top_k=0, top_p=0.7, presence_penalty=0)
    seen = {int(_choose(logits, [0], [s], stats, [torch.Generator().manual_seed(i)])[0]) for i in range(200)}
    assert seen == {0, 1}


@pytest.mark.parametrize("impl", ["layer", "pieces"])
def test_step_implementations_agree(tiny, impl):
    """Both step implementations (one function per layer; three pieces with eager cache writes) match generate."""
    model, processor = tiny
    decoder = DecodeModel(model, slots=2, max_len=256)
    decoder.set_impl(impl)
    from qvl.data.packing import rope_index_fn
    from qvl.models.tokens import token_ids

    b = ContinuousBatcher(decoder, _Collect, token_ids(processor.tokenizer).pad, rope_index_fn(model), coalesce_s=0)
    job = _job(processor, PROMPTS["image"])
    _run_until_done(b, {0: [job]})
    assert job.handle.emit_tokens == _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)


@pytest.mark.slow
def test_compiled_step_matches_eager(tiny):
    """torch.compile of the step (what runs on a GPU) gives the eager tokens (CPU inductor; slow: compiles)."""
    model, processor = tiny
    from qvl.data.packing import rope_index_fn
    from qvl.models.tokens import token_ids

    outs = []
    for compiled in (False, True):
        decoder = DecodeModel(model, slots=2, max_len=256, compile=compiled)
        b = ContinuousBatcher(decoder, _Collect, token_ids(processor.tokenizer).pad, rope_index_fn(model),
                              coalesce_s=0)
        job = _job(processor, PROMPTS["image"], GREEDY.replace(max_new_tokens=8))
        _run_until_done(b, {0: [job]})
        outs.append(job.handle.emit_tokens)
    assert outs[0] == outs[1]


def test_adapter_folder_is_merged_for_the_fast_path(tiny_model_dir, tmp_path):
    """`qvl serve -m RUN` on a LoRA run folder: base + adapter merged in memory, so the fast path serves it."""
    from peft import LoraConfig, get_peft_model

    from qvl.models.load import load_model

    peft_model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    e = TransformersEngine.load(str(tmp_path / "adapter"), device="cpu", say=lambda *_: None)
    try:
        assert e.batcher is not None and not hasattr(e.model, "peft_config")
    finally:
        e.close()


# ---------------------------------------------------------------------------- vision cache (multi-turn)


def test_follow_up_turn_does_not_encode_its_image_again(tiny):
    """Turn 2 re-sends turn 1's image: the tower runs on no item of it (only on a new image), and the answers
    equal those of an engine without the cache and of model.generate."""
    from qvl.data.samples import Message as M
    from qvl.infer.types import Request

    red, blue = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (48, 64), "blue")
    sampling = SamplingParams(temperature=0.0, presence_penalty=0.0, max_new_tokens=8, ignore_eos=True)
    cached = TransformersEngine(*tiny, name="tiny", fast=True, max_batch_size=2)
    plain = TransformersEngine(*tiny, name="tiny", fast=True, max_batch_size=2, vision_cache_mb=0)
    reference = TransformersEngine(*tiny, name="tiny", fast=False)
    try:
        cache = cached.vision_cache
        assert cache is not None and plain.vision_cache is None
        for e in (cached, plain):  # the tower alone here (a kept prefix would skip the image altogether)
            e.batcher.reuse_prefixes = False
        turn1 = [M("user", [Media("image", red), "what is this?"])]
        answer = cached.generate(Request(turn1, sampling)).text
        assert cache.encoded_items == 1 and cache.hits == 0
        turn2 = turn1 + [M("assistant", [answer]), M("user", ["and its colour?"])]
        second = cached.generate(Request(turn2, sampling)).text
        assert cache.encoded_items == 1 and cache.hits == 1  # the tower did not run again
        assert second == plain.generate(Request(turn2, sampling)).text == \
            reference.generate(Request(turn2, sampling)).text
        turn3 = turn2 + [M("assistant", [second]), M("user", [Media("image", blue), "and this one?"])]
        third = cached.generate(Request(turn3, sampling)).text
        assert cache.encoded_items == 2 and cache.hits == 2  # only the new image was encoded
        assert third == plain.generate(Request(turn3, sampling)).text
        assert "forward" not in cached.batcher.decoder.base.model.visual.__dict__  # the model is left as it was
    finally:
        for e in (cached, plain, reference):
            e.close()


def test_vision_cache_is_bounded(tiny):
    from qvl.infer.vision_cache import VisionCache, media_keys

    model, processor = tiny
    visual = model.model.visual
    encs = [_encode(processor, [Media("image", Image.new("RGB", (64, 48), (i, 0, 0))), "?"]) for i in range(5)]
    keys = [media_keys(e)["pixel_values"][0] for e in encs]
    assert len(set(keys)) == 5 and media_keys(encs[0]) == media_keys(_encode(
        processor, [Media("image", Image.new("RGB", (64, 48), (0, 0, 0))), "?"]))  # the same pixels, the same key
    cache = VisionCache(visual, max_bytes=10**9, max_items=3)
    with torch.inference_mode(), cache.attached():
        for e, k in zip(encs, keys):
            cache.expect(e.pixel_values, [k])
            visual(e.pixel_values, grid_thw=e.image_grid_thw)
    assert list(cache.entries) == keys[2:] and cache.encoded_items == 5
    one = sum(t.numel() * t.element_size() for t in (cache.entries[keys[2]][0], *cache.entries[keys[2]][1]))
    assert cache.bytes == 3 * one
    small = VisionCache(visual, max_bytes=2 * one)
    with torch.inference_mode(), small.attached():
        for e, k in zip(encs, keys):
            small.expect(e.pixel_values, [k])
            visual(e.pixel_values, grid_thw=e.image_grid_thw)
    assert len(small.entries) == 2 and small.bytes <= 2 * one


def test_follow_up_turn_prefills_only_what_its_kept_prefix_lacks(tiny):
    """Turn 2 continues turn 1's prompt: it takes turn 1's freed slot and runs only the answer and the new
    question on top of the kept keys/values; its answer equals a full prefill's and model.generate's, also
    when the kept slot sat inside a decoding batch meanwhile (free rows advance each step). Another image of
    the same size (the same placeholder tokens) is not mistaken for it."""
    import time

    from qvl.data.samples import Message as M
    from qvl.infer.types import Request

    red, other = Image.new("RGB", (64, 48), "red"), Image.new("RGB", (64, 48), "green")
    sampling = SamplingParams(temperature=0.0, presence_penalty=0.0, max_new_tokens=8, ignore_eos=True)
    reusing = TransformersEngine(*tiny, name="tiny", fast=True, max_batch_size=2)
    plain = TransformersEngine(*tiny, name="tiny", fast=True, max_batch_size=2, vision_cache_mb=0)
    plain.batcher.reuse_prefixes = False
    reference = TransformersEngine(*tiny, name="tiny", fast=False)
    try:
        b = reusing.batcher
        system = [M("system", ["You are a careful assistant who describes pictures in detail. " * 3])]
        turn1 = system + [M("user", [Media("image", red), "what is this?"])]
        first = reusing.stream(Request(turn1, sampling))  # slot 0
        long = reusing.stream(Request([M("user", ["keep going"])], sampling.replace(max_new_tokens=400)))  # slot 1
        answer = first.result().text
        assert b.reused_tokens == 0 and list(b.kept) == [0]
        steps = b.steps
        deadline = time.time() + 60
        while b.steps < steps + 20 and time.time() < deadline:  # the kept slot sits in the decoding batch a while
            time.sleep(0.005)
        turn2 = turn1 + [M("assistant", [answer]), M("user", ["and its colour?"])]
        second = reusing.generate(Request(turn2, sampling)).text
        long.result()
        kept = len(reusing.prepare(Request(turn1, sampling)).inputs)
        assert b.reused_tokens == kept  # the whole turn-1 prompt, image included, was not run again
        assert second == plain.generate(Request(turn2, sampling)).text == \
            reference.generate(Request(turn2, sampling)).text
        swapped = system + [M("user", [Media("image", other), "what is this?"]), M("assistant", [answer]),
                            M("user", ["and its colour?"])]
        third = reusing.generate(Request(swapped, sampling)).text
        assert b.reused_tokens == kept  # same tokens, other pixels: prefilled in full
        assert third == plain.generate(Request(swapped, sampling)).text
    finally:
        for e in (reusing, plain, reference):
            e.close()


@pytest.mark.parametrize("impl", ["padded", "packed"])
def test_a_prefill_batch_is_capped_by_what_it_computes(tiny, fast, monkeypatch, impl):
    """A padded prefill pads every row to the longest prompt: a long prompt and short ones are admitted while
    rows x longest stays within max_prefill_tokens (what the plan counts), not their sum. A packed one computes
    their sum. Either way a lone prompt above it still goes (alone)."""
    _, processor = tiny
    monkeypatch.setattr(fast[0], "prefill_impl", impl)
    long_job = _job(processor, ["describe " * 40], GREEDY.replace(max_new_tokens=1))
    shorts = [_job(processor, [f"hi {i}"], GREEDY.replace(max_new_tokens=1)) for i in range(3)]
    longest, short = long_job.prepared.prompt_tokens, shorts[0].prepared.prompt_tokens
    batches = []
    b = _batcher(fast, _Collect)
    b.max_prefill_tokens = 2 * longest + 1  # the sum of all four fits; three rows padded to the longest do not
    assert longest + 3 * short <= b.max_prefill_tokens < 3 * longest
    prefill = b._prefill
    monkeypatch.setattr(b, "_prefill", lambda slots, jobs: (batches.append(len(jobs)), prefill(slots, jobs))[1])
    _run_until_done(b, {0: [long_job, *shorts]})
    assert batches[0] == (2 if impl == "padded" else 4) and sum(batches) == 4
    assert all(j.handle.emit_tokens for j in (long_job, *shorts))
    alone = _batcher(fast, _Collect)
    alone.max_prefill_tokens = longest - 1
    job = _job(processor, ["describe " * 40], GREEDY.replace(max_new_tokens=1))
    _run_until_done(alone, {0: [job]})
    assert job.handle.emit_tokens


def _positioned(fast, job):
    """As the engine's prepare leaves it: the prompt's positions computed."""
    from qvl.data.packing import sample_positions

    job.prepared.inputs.positions = sample_positions(job.prepared.inputs, fast[3])
    return job


def test_a_long_prompt_arriving_while_others_decode_is_prefilled_in_parts(tiny, fast, monkeypatch):
    """A prompt above prefill_part_tokens that comes while others decode is prefilled a part per turn, with decode
    steps of the others between its parts; all answer as model.generate does. Its slot (3) is inside the running
    batch's bucket (4 rows), whose decode steps compute it too."""
    from qvl.infer import packed_prefill

    model, processor = tiny
    b = _batcher(fast, _Collect)
    b.prefill_part_tokens = 8
    others = [_positioned(fast, _job(processor, PROMPTS[kind])) for kind in ("text", "image", "video")]
    long = _positioned(fast, _job(processor, PROMPTS["two_images"]))
    n = long.prepared.prompt_tokens
    assert n > 3 * b.prefill_part_tokens
    steps_at_parts, real = [], packed_prefill.prefill_part
    monkeypatch.setattr(packed_prefill, "prefill_part",
                        lambda d, slot, row, a, e: (steps_at_parts.append(b.steps), real(d, slot, row, a, e))[1])
    slots = []
    start = b._start_in_parts
    monkeypatch.setattr(b, "_start_in_parts", lambda *a: (start(*a), slots.append(b.in_parts.slot)))
    _run_until_done(b, {0: others, 2: [long]})
    assert slots == [3] and len(steps_at_parts) == -(-n // b.prefill_part_tokens)
    assert all(x < y for x, y in zip(steps_at_parts, steps_at_parts[1:]))  # a decode step between parts
    for job in (*others, long):
        assert job.handle.emit_tokens == _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    assert b.in_parts is None and not b.running


def test_a_prompt_cancelled_while_prefilled_in_parts_frees_its_slot(tiny, fast):
    _, processor = tiny
    b = _batcher(fast, _Collect)
    b.prefill_part_tokens = 8
    short = _positioned(fast, _job(processor, PROMPTS["text"], GREEDY.replace(max_new_tokens=12)))
    long = _positioned(fast, _job(processor, PROMPTS["two_images"]))
    b.submit(short)
    b.turn()
    b.submit(long)
    b.turn()  # embedded
    b.turn()  # its first part
    assert b.in_parts is not None and b.in_parts.done == 8
    held = b.in_parts.slot
    long.handle.cancel()
    b.turn()
    assert b.in_parts is None and [c.finish_reason for c in long.handle] == ["cancelled"] and held not in b.kept
    assert fast[0].length[held] == fast[0].max_len - 1  # parked: decode steps write nowhere it matters
    _run_until_done(b, {0: []})
    assert len(short.handle.emit_tokens) == 12


def test_a_kept_prompt_with_media_is_reused_only_by_content_key(tiny):
    """With the vision cache off the engine makes no content keys: a follow-up with the same tokens may hold
    other pixels (another image of the same size), so a kept prompt with media is not reused for it."""
    from qvl.infer.prefix import Kept, find
    from qvl.infer.vision_cache import media_keys

    _, processor = tiny
    parts = [PROMPTS["image"][0], "describe it in detail " * 8]
    first, follow = _encode(processor, parts), _encode(processor, parts + ["and its colour?"])
    keys = media_keys(first)
    prefix = first.input_ids[:40]  # the image and text both prompts start with
    assert len(prefix) >= 32 and torch.equal(follow.input_ids[:len(prefix)], prefix)
    follow.positions = torch.zeros(4, len(follow), dtype=torch.long)
    assert find({0: Kept(prefix, {})}, [0], follow, None, 512) is None
    assert find({0: Kept(prefix, keys)}, [0], follow, media_keys(follow), 512) == (0, len(prefix))


def test_a_prompt_in_parts_whose_part_fails_is_prefilled_padded(tiny, fast, monkeypatch):
    """A part that fails (not for memory or length) switches the decoder to the padded prefill, as a packed
    prefill's failure does; the request goes first in line again and is answered as model.generate does."""
    from qvl.infer import packed_prefill

    model, processor = tiny
    d = fast[0]
    monkeypatch.setattr(d, "prefill_impl", "packed")
    monkeypatch.setattr(d, "prefill_why_padded", None)

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(packed_prefill, "prefill_part", broken)
    b = _batcher(fast, _Collect)
    b.prefill_part_tokens = 8
    short = _positioned(fast, _job(processor, PROMPTS["text"]))
    long = _positioned(fast, _job(processor, PROMPTS["two_images"]))
    _run_until_done(b, {0: [short], 2: [long]})
    assert d.prefill_impl == "padded" and "no kernel for this" in d.prefill_why_padded
    assert long.handle.emit_tokens == _generate_ids(model, processor, long.prepared.inputs, GREEDY.max_new_tokens)


def test_requests_behind_a_long_prompt_waiting_for_the_one_in_parts_are_admitted(tiny, fast):
    """Only one prompt goes in parts at a time: a second long one waits for it, but shorter ones behind it do not."""
    _, processor = tiny
    b = _batcher(fast, _Collect)
    b.prefill_part_tokens = 16
    running = _positioned(fast, _job(processor, PROMPTS["text"]))
    first, second = (_positioned(fast, _job(processor, PROMPTS["two_images"])) for _ in range(2))
    short = _positioned(fast, _job(processor, ["hi"]))
    assert short.prepared.prompt_tokens <= b.prefill_part_tokens < first.prepared.prompt_tokens
    b.submit(running)
    b.turn()
    for job in (first, second, short):
        b.submit(job)
    b.turn()  # the first long prompt starts in parts (embedded)
    assert b.in_parts is not None and b.in_parts.job is first
    b.turn()  # its first part; the second waits for it, the short one behind it is admitted
    assert [j for _, j in b.waiting] == [second] and any(r.row.job is short for r in b.running.values())
    _run_until_done(b, {0: []})
    assert all(j.handle.emit_tokens for j in (running, first, second, short))
