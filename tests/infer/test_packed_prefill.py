"""The packed prefill (qvl.infer.packed_prefill) against the padded one (transformers' forward, DecodeModel.prefill):
the same last logits, the same keys/values in every slot, the same decode state, with text, images and a video in
one batch; through the vision cache too. Tiny model, CPU, float32."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from PIL import Image

from qvl.data.packing import rope_index_fn, sample_positions
from qvl.data.preprocess import encode
from qvl.data.samples import Media, Message, Sample
from qvl.infer import packed_prefill
from qvl.infer.decode import DecodeModel
from qvl.infer.vision_cache import VisionCache, media_keys
from test_fast_decode_moe import tiny_moe  # noqa: F401 -- a fixture (the tiny MoE checkpoint)


def _video():
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from helpers import write_video

    return str(write_video(Path(tempfile.mkdtemp()) / "clip.mp4", frames=8, fps=4))


HAS_AV = importlib.util.find_spec("av") is not None  # PyAV writes the test video (the GPU machine may lack it)
PROMPTS = [
    ["describe the red circle in detail"],
    [Media("image", Image.new("RGB", (96, 64), "blue")), "what shape is this?"],
    [Media("video", _video()), "what happens?"] if HAS_AV else [Media("image", Image.new("RGB", (48, 80))), "and?"],
    [Media("image", Image.new("RGB", (64, 64), "red")), Media("image", Image.new("RGB", (32, 64), "green")),
     "compare these two pictures, then say which one is larger"],
]


def _encoded(model, processor):
    rope = rope_index_fn(model)
    encs = [encode(Sample([Message("user", parts)]), processor, for_generation=True) for parts in PROMPTS]
    return encs, [sample_positions(e, rope) for e in encs]


@pytest.fixture(scope="module")
def prompts(tiny):
    return _encoded(*tiny)


def _padded(d, slots, encs, positions):
    """DecodeModel.prefill's inputs as the batcher makes them."""
    from qvl.data.collate import collate

    batch = {k: v.to(d.device) if torch.is_tensor(v) else v  # on the decoder's device, as the batcher gives it
             for k, v in collate(encs, pad_id=0, padding_side="right").items()}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in batch:
            batch[key] = batch[key].to(d.dtype)
    padded = torch.zeros(4, len(encs), batch["input_ids"].shape[1], dtype=torch.long)
    for i, p in enumerate(positions):
        padded[:, i, :p.shape[1]] = p
    return d.prefill(slots, batch, padded.to(d.device), [len(e) for e in encs])


def _same_kv(got, want, tol: float) -> None:
    """Keys / values per prompt and layer (``_state``'s first part) equal within ``tol``."""
    for prompt_got, prompt_want in zip(got, want, strict=True):
        for (k, v), (k_want, v_want) in zip(prompt_got, prompt_want, strict=True):
            torch.testing.assert_close(k, k_want, rtol=tol, atol=tol)
            torch.testing.assert_close(v, v_want, rtol=tol, atol=tol)


def _state(d, slots, lengths):
    """Each prompt's keys / values per layer, then the slots' lengths, RoPE offsets and host lengths."""
    return ([[(d.k[i][s, :, :n].clone(), d.v[i][s, :, :n].clone()) for i in range(len(d.k))]
             for s, n in zip(slots, lengths)],
            d.length[slots].tolist(), d.rope_delta[slots].tolist(), [d.host_length[s] for s in slots])


def test_the_default_for_a_qwen3_vl_model(tiny):
    model, _ = tiny
    assert DecodeModel(model, slots=2, max_len=64).prefill_impl == "packed"


def test_packed_prefill_equals_the_padded_one(tiny, prompts):
    model, _ = tiny
    encs, positions = prompts
    slots, lengths = [3, 0, 2, 1], [len(e) for e in encs]
    d = DecodeModel(model, slots=4, max_len=256)
    want = _padded(d, slots, encs, positions)
    want_kv, *want_state = _state(d, slots, lengths)
    d = DecodeModel(model, slots=4, max_len=256)
    got = packed_prefill.prefill(d, slots, encs, positions)
    got_kv, *got_state = _state(d, slots, lengths)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert got_state == want_state
    _same_kv(got_kv, want_kv, 1e-4)


def test_packed_prefill_through_the_vision_cache(tiny, prompts):
    """Kept images are not encoded again; a batch mixing kept and new items gives what encoding them all gives."""
    model, _ = tiny
    encs, positions = prompts
    d = DecodeModel(model, slots=4, max_len=256)
    cache = VisionCache(d.base.model.visual, 2**26)
    keys = [media_keys(e) for e in encs]
    packed_prefill.prefill(d, [0], encs[3:], positions[3:], keys[3:], cache)  # the two images of the last prompt
    assert (cache.encoded_items, cache.hits) == (2, 0)
    want = packed_prefill.prefill(DecodeModel(model, slots=4, max_len=256), [0, 1, 2, 3], encs, positions)
    got = packed_prefill.prefill(d, [0, 1, 2, 3], encs, positions, keys, cache)
    assert cache.hits == 2 and cache.encoded_items == 4  # the blue image and the video are new
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _continued(model, first):
    """``first``'s prompt followed by seven more text tokens (a follow-up turn's tokens), positions included."""
    import dataclasses

    more = torch.tensor([11, 12, 13, 14, 15, 16, 17])
    follow = dataclasses.replace(first, input_ids=torch.cat([first.input_ids, more]), labels=None,
                                 mm_token_type_ids=torch.cat([first.mm_token_type_ids, torch.zeros_like(more)]))
    follow.positions = sample_positions(follow, rope_index_fn(model))
    return follow


def test_the_rest_of_a_follow_up_equals_prefix_prefill_rest_and_a_full_prefill(tiny, prompts):
    """A follow-up whose prompt continues a kept one (image and all) runs only its new tokens on top of the kept
    keys / values: as qvl.infer.prefix.prefill_rest does, and as prefilling it whole does."""
    from qvl.infer.prefix import prefill_rest

    model, _ = tiny
    encs, positions = prompts
    first = encs[1]
    follow = _continued(model, first)
    start, n = len(first), len(follow)
    results = []
    for impl in ("padded", "packed"):
        d = DecodeModel(model, slots=2, max_len=256)
        packed_prefill.prefill(d, [1], [first], [positions[1]])
        logits = (prefill_rest(d, 1, start, follow) if impl == "padded"
                  else packed_prefill.rest(d, 1, start, follow, follow.positions))
        results.append((logits, _state(d, [1], [n])))
    whole = DecodeModel(model, slots=2, max_len=256)
    want = packed_prefill.prefill(whole, [1], [follow], [follow.positions])
    for logits, (kv, *state) in results:
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4)
        assert tuple(state) == _state(whole, [1], [n])[1:]
        _same_kv(kv, _state(whole, [1], [n])[0], 1e-4)


def test_warm_leaves_the_slots_free(tiny):
    model, _ = tiny
    d = DecodeModel(model, slots=2, max_len=64)
    packed_prefill.warm(d)
    assert not d.busy and d.host_length == [0, 0] and d.length.tolist() == [0, 0]
    assert d.rope_delta.tolist() == [0, 0]


def test_a_failing_packed_prefill_falls_back_to_the_padded_one(tiny, monkeypatch, caplog):
    """Should the packed prefill fail (not for memory or the prompt), the request is prefilled padded, answers as
    model.generate does, and the decoder prefills padded from then on, said once in the log."""
    from test_fast_decode import GREEDY, PROMPTS, _batcher, _Collect, _generate_ids, _job, _run_until_done

    from qvl.models.tokens import token_ids

    model, processor = tiny
    d = DecodeModel(model, slots=2, max_len=256)
    fast = (d, processor, token_ids(processor.tokenizer).pad, rope_index_fn(model))

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(packed_prefill, "prefill", broken)
    job = _job(processor, PROMPTS["image"])
    with caplog.at_level("WARNING", logger="qvl.infer"):
        _run_until_done(_batcher(fast, _Collect), {0: [job]})
    assert job.handle.emit_tokens == _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    assert d.prefill_impl == "padded" and "RuntimeError: no kernel for this" in d.prefill_why_padded
    assert sum("packed prefill failed" in r.getMessage() for r in caplog.records) == 1


def test_failing_whole_layers_step_down_to_the_pieces(tiny, monkeypatch, caplog):
    """Should a whole compiled prefill layer fail (a compiler or kernel failure in the one part that runs nowhere
    else), the request is prefilled again with the layers as pieces, still packed, and answers as model.generate
    does; the pieces run from then on, said once. The flash kernel is stood in for, as the whole layers need it."""
    from test_fast_decode import GREEDY, PROMPTS, _batcher, _Collect, _generate_ids, _job, _run_until_done

    from qvl.models.tokens import token_ids

    _varlen_op_stand_in(monkeypatch)
    model, processor = tiny
    d = DecodeModel(model, slots=2, max_len=256)
    assert packed_prefill.whole_layers(d)
    fast = (d, processor, token_ids(processor.tokenizer).pad, rope_index_fn(model))

    def broken(*args, **kwargs):
        raise RuntimeError("inductor failed")

    d._fns = dict(d._fns, packed_layer=broken)
    job = _job(processor, PROMPTS["image"])
    with caplog.at_level("WARNING", logger="qvl.infer"):
        _run_until_done(_batcher(fast, _Collect), {0: [job]})
    assert job.handle.emit_tokens == _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    assert d.prefill_impl == "packed" and d.prefill_layers == "pieces" and not packed_prefill.whole_layers(d)
    assert [r.getMessage().split(";")[0] for r in caplog.records if r.levelname == "WARNING"] == [
        "the packed prefill's whole compiled layers failed (RuntimeError: inductor failed)"]


@pytest.mark.parametrize("layers", ["pieces", "whole", "whole-if-single"])
def test_compiled_packed_prefill_reuses_the_decode_steps_graphs(tiny, prompts, layers, monkeypatch):
    """On a GPU the prefill's layers are compiled with dynamic shapes: once the decode step has compiled (batches of
    1 and 2+) and warm() has run, prefills of any length and follow-up turns compile nothing more, and give the eager
    logits (CPU inductor; slow: compiles). "pieces": attn_in and mlp_out (the step's default, one function per
    layer, leaves them to warm()); "whole": one graph per layer around the flash varlen kernel, a custom op standing
    in for it here as torch's is one; "whole-if-single" (MoE's default): a lone prompt's layers whole (the first and
    last rows below, and the follow-ups), several prompts' as the pieces."""
    from torch._dynamo.utils import counters

    if layers != "pieces":
        _varlen_op_stand_in(monkeypatch)
    model, _ = tiny
    encs, positions = prompts
    d = DecodeModel(model, slots=4, max_len=256, compile=True)
    d.prefill_layers = layers
    with torch.inference_mode():
        for rows in (1, 2):
            d._step(rows, 128)
    packed_prefill.warm(d)
    graphs = counters["stats"]["unique_graphs"]
    for chosen in ([0], [1, 2], [0, 1, 2, 3], [3]):
        got = packed_prefill.prefill(d, list(range(len(chosen))), [encs[i] for i in chosen],
                                     [positions[i] for i in chosen])
        want = packed_prefill.prefill(DecodeModel(model, slots=4, max_len=256), list(range(len(chosen))),
                                      [encs[i] for i in chosen], [positions[i] for i in chosen])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for slot in range(len(chosen)):
            d.release(slot)
    n = len(encs[0])
    for slot in (0, 2):  # slot 0 and another: the slot's cache views must not mean a graph per slot
        packed_prefill.prefill(d, [slot], [encs[0]], [positions[0]])
        packed_prefill.rest(d, slot, n - 5 - slot, encs[0], positions[0])  # its last tokens again, as a follow-up's
        d.release(slot)
    assert counters["stats"]["unique_graphs"] == graphs


def _varlen_op_stand_in(monkeypatch):
    """:func:`_flash_varlen_stand_in` as a custom op (torch's varlen attention is one: dynamo keeps it whole in the
    graph, shapes from its fake), put where qvl.data.packing finds the kernel, usable on the CPU."""
    from qvl.data import packing

    @torch.library.custom_op("qvl_test::varlen", mutates_args=())
    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
           max_k: int, scale: float, right: int) -> torch.Tensor:
        return _flash_varlen_stand_in([])(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=(-1, right))

    @op.register_fake
    def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, right):
        return torch.empty_like(q)

    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        return op(q, k, v, cu_q, cu_k, max_q, max_k, scale, window_size[1])

    monkeypatch.setattr(packing, "_VARLEN", (varlen, True))
    monkeypatch.setattr(packing, "varlen_usable", lambda query, dropout: True)


def test_attention_off_the_varlen_kernel_gives_sdpa_every_head(tiny, prompts, monkeypatch):
    """Where the flash varlen kernel does not run (the CPU here) sdpa gets as many key / value heads as query
    heads, the follow-up's rest's masked calls too: on torch 2.11, sdpa's enable_gqa works only with flash and the
    math kernel, and the math kernel holds the whole score matrix. The rest's calls leave cuDNN's kernel out (it
    plans each new shape on the host, and every turn has a new one)."""
    import torch.nn.functional as F

    model, _ = tiny
    encs, positions = prompts
    calls, cudnn, real = [], [], F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], v.shape[1], kwargs.get("enable_gqa", False)))
        cudnn.append(torch.backends.cuda.cudnn_sdp_enabled())
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(packed_prefill.F, "scaled_dot_product_attention", spy)
    d = DecodeModel(model, slots=2, max_len=256)
    assert d.n_q > d.n_kv  # the tiny model groups its query heads
    packed_prefill.prefill(d, [0], [encs[0]], [positions[0]])
    follow = _continued(model, encs[0])
    before = len(calls)
    packed_prefill.rest(d, 0, len(encs[0]), follow, follow.positions)
    assert calls and all(q == k == v and not gqa for q, k, v, gqa in calls), calls
    assert len(calls) > before and not any(cudnn[before:]) and torch.backends.cuda.cudnn_sdp_enabled()


def _flash_varlen_stand_in(calls):
    """torch's varlen_attn as flash computes it, in plain torch for the CPU: per segment pair of ``cu_q`` /
    ``cu_k``, causal aligned to the key segment's end (flash's rule where a segment has more keys than queries), grouped
    key / value heads shared by their query heads. Records (query heads, key heads, query length, key length)."""
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        outs = []
        for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
            calls.append((q.shape[1], k.shape[1], qe - qs, ke - ks))
            kk, vv = (t[ks:ke].repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
            lq, lk = qe - qs, ke - ks
            mask = (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)) if window_size[1] == 0 else None
            out = torch.nn.functional.scaled_dot_product_attention(
                q[qs:qe].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=mask, scale=scale)
            outs.append(out.transpose(0, 1))
        return torch.cat(outs)

    return varlen


def test_a_follow_up_on_the_varlen_kernel_equals_the_masked_sdpa_one(tiny, prompts, monkeypatch):
    """On a GPU a follow-up's rest attends in one flash varlen call: its new tokens as the queries, the slot's first
    entries as one longer key segment, read as cached (grouped heads, no copy per query head). A stand-in with flash's
    rule takes the calls here: the logits and the slot's keys / values equal the masked sdpa path's."""
    from qvl.data import packing

    model, _ = tiny
    encs, positions = prompts
    first = encs[1]
    follow = _continued(model, first)
    start, n = len(first), len(follow)
    results, calls = [], []
    for varlen in (False, True):
        if varlen:
            monkeypatch.setattr(packing, "_VARLEN", (_flash_varlen_stand_in(calls), True))
            monkeypatch.setattr(packing, "varlen_usable", lambda query, dropout: True)
        d = DecodeModel(model, slots=2, max_len=256)
        packed_prefill.prefill(d, [1], [first], [positions[1]])
        before = len(calls)
        logits = packed_prefill.rest(d, 1, start, follow, follow.positions)
        results.append((logits, _state(d, [1], [n])))
    assert d.n_q > d.n_kv and calls[before:] == [(d.n_q, d.n_kv, n - start, n)] * len(d.k)
    (want, (kv_want, *state_want)), (got, (kv, *state)) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert state == state_want
    _same_kv(kv, kv_want, 1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_whole_compiled_layers_equal_the_pieces_on_the_varlen_kernel(request, kind, monkeypatch):
    """Where the flash varlen kernel runs, each layer of a prefill is one graph (qvl.infer.decode.packed_layer: the
    cache writes and the attention inside). Against the pieces (the stand-in taking both's calls): four prompts in
    one row, a prompt in parts and a follow-up turn leave the same logits, keys / values and decode state; the
    follow-up's key segment is the slot's cache read in place (no copy of it). Dense, and MoE (grouped experts)."""
    from qvl.data import packing

    model, processor = request.getfixturevalue("tiny")[:2] if kind == "dense" else request.getfixturevalue(
        "tiny_moe")[:2]
    encs, positions = _encoded(model, processor)
    calls, totals = [], []
    stand_in = _flash_varlen_stand_in(calls)

    def spy(q, k, v, *args, **kwargs):
        totals.append((k.shape[0], k.is_contiguous()))
        return stand_in(q, k, v, *args, **kwargs)

    monkeypatch.setattr(packing, "_VARLEN", (spy, True))
    monkeypatch.setattr(packing, "varlen_usable", lambda query, dropout: True)
    slots, lengths = [3, 0, 2, 1], [len(e) for e in encs]
    follow = _continued(model, encs[1])
    results = {}
    for layers in ("pieces", "whole"):
        d = DecodeModel(model, slots=4, max_len=256)
        d.prefill_layers = layers
        logits = [packed_prefill.prefill(d, slots, encs, positions)]
        for s in slots:
            d.release(s)
        row = packed_prefill.embed(d, encs[2:3], positions[2:3])
        n = lengths[2]
        logits += [packed_prefill.prefill_part(d, 1, row, a, b) for a, b in ((0, 6), (6, n // 2), (n // 2, n))][2:]
        packed_prefill.prefill(d, [3], [encs[1]], [positions[1]])
        del totals[:]
        logits.append(packed_prefill.rest(d, 3, lengths[1], follow, follow.positions))
        results[layers] = (logits, _state(d, [1, 3], [n, len(follow)]), list(totals))
    (want, (kv_want, *state_want), _), (got, (kv, *state), follow_keys) = results["pieces"], results["whole"]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert state == state_want
    _same_kv(kv, kv_want, 1e-5)
    assert follow_keys == [(len(follow), False)] * len(d.k)  # the slot's first entries, as they lie in its cache
    # the default: whole layers for dense models (faster in every row measured); MoE whole for a lone prompt only
    default = DecodeModel(model, slots=2, max_len=64)
    assert default.prefill_layers == ("whole" if kind == "dense" else "whole-if-single")
    assert packed_prefill.whole_layers(default, 1) and packed_prefill.whole_layers(default, 2) == (kind == "dense")
    ran = []  # MoE: a lone prompt's layers run whole, two prompts' as the pieces
    layer = default._fns["packed_layer"]
    default._fns = dict(default._fns, packed_layer=lambda *a: ran.append("whole") or layer(*a))
    for chosen in ([1], [1, 2]):
        del ran[:]
        packed_prefill.prefill(default, list(range(len(chosen))), [encs[i] for i in chosen],
                               [positions[i] for i in chosen])
        assert len(ran) == (len(default.k) if kind == "dense" or len(chosen) == 1 else 0)
        for slot in range(len(chosen)):
            default.release(slot)


@pytest.mark.parametrize("which", [1, 2])  # an image prompt, a video prompt
def test_a_prompt_prefilled_in_parts_equals_it_prefilled_whole(tiny, prompts, which):
    """A long prompt prefilled a part at a time (each part on top of the parts before, cut anywhere, inside an
    image's tokens too) leaves the same keys / values and decode state, and gives the same last logits."""
    model, _ = tiny
    encs, positions = prompts
    enc, n = encs[which], len(encs[which])
    whole = DecodeModel(model, slots=2, max_len=256)
    want = packed_prefill.prefill(whole, [1], [enc], [positions[which]])
    d = DecodeModel(model, slots=2, max_len=256)
    row = packed_prefill.embed(d, [enc], [positions[which]])
    cuts = [0, 5, n // 2, n - 1, n]
    got = [packed_prefill.prefill_part(d, 1, row, a, b) for a, b in zip(cuts[:-1], cuts[1:])]
    assert got[:-1] == [None] * (len(cuts) - 2) and d.host_length[1] == n
    torch.testing.assert_close(got[-1], want, rtol=1e-4, atol=1e-4)
    (kv, *state), (kv_want, *state_want) = _state(d, [1], [n]), _state(whole, [1], [n])
    assert state == state_want
    _same_kv(kv, kv_want, 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind, layers", [("dense", "pieces"), ("dense", "whole"), ("moe", "pieces"), ("moe", "whole")])
def test_on_the_gpu_packed_prefill_and_its_parts_agree_with_the_padded_one(request, kind, layers):
    """What a GPU runs (bf16, the layers compiled as pieces or whole, the flash varlen kernel; for a part and a
    follow-up turn, its key segment the slot's cache read in place): logits within bf16's rounding of transformers'
    forward over the padded batch, each next token one of its best (a near tie may go either way in bf16)."""
    import copy

    model, processor = request.getfixturevalue("tiny" if kind == "dense" else "tiny_moe")[:2]
    gpu = copy.deepcopy(model).to("cuda", torch.bfloat16)
    encs, positions = _encoded(model, processor)
    slots, lengths = [3, 0, 2, 1], [len(e) for e in encs]
    padded = _padded(DecodeModel(gpu, slots=4, max_len=256), slots, encs, positions)
    d = DecodeModel(gpu, slots=4, max_len=256)
    d.prefill_layers = layers
    assert d.compiled and d.prefill_impl == "packed"
    packed = packed_prefill.prefill(d, slots, encs, positions)
    torch.testing.assert_close(packed, padded, rtol=0.05, atol=0.05)
    chosen = padded.gather(1, packed.argmax(-1, keepdim=True))[:, 0]
    assert (chosen >= padded.max(-1).values - 0.05).all()
    row = packed_prefill.embed(d, encs[1:2], positions[1:2])
    n = lengths[1]
    parts = [packed_prefill.prefill_part(d, 3, row, a, b) for a, b in ((0, 7), (7, n // 2), (n // 2, n))]
    torch.testing.assert_close(parts[-1][0], padded[1], rtol=0.05, atol=0.05)
    # a follow-up turn on top of the prompt just prefilled in parts: the parts' and its attention are the flash
    # varlen call whose key segment is the slot's cache, not the masked sdpa one
    from qvl.data.packing import varlen_usable

    assert varlen_usable(d.k[0], 0.0)
    follow = _continued(model, encs[1])
    rest = packed_prefill.rest(d, 3, n, follow, follow.positions)
    whole = _padded(DecodeModel(gpu, slots=4, max_len=256), [0], [follow], [follow.positions])
    torch.testing.assert_close(rest, whole, rtol=0.05, atol=0.05)
    assert whole[0, rest.argmax()] >= whole.max() - 0.05
