"""qvl.infer.attend_kernels: a decode step's split-key attention kernel, run by Triton's interpreter on the CPU,
against the plain path (qvl.infer.decode.attend), and decoding with it against model.generate.

The interpreter must be on before Triton is first imported, so the tests that run the kernel run in a child pytest
of this file with ``TRITON_INTERPRET=1`` (:func:`test_the_kernel_under_the_interpreter`)."""

from __future__ import annotations

import pytest
import torch

from qvl.infer import attend_kernels
from qvl.infer.decode import attend

from test_fast_decode_moe import tiny_moe  # noqa: F401 -- a fixture (the tiny MoE checkpoint)
from triton_child import INTERPRETING, interpreted, run_under_the_interpreter  # noqa: F401 -- a fixture too

pytest.importorskip("triton")


@pytest.mark.child_pytest
@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_the_kernel_under_the_interpreter():
    run_under_the_interpreter(__file__, least_passed=37)


def cache(rows, n_q, n_kv, d, keys, dtype, seed=0):
    """q (rows, Hq, D) and a slot cache one slot larger and longer than read (so the step reads strided views),
    each row with its own length."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, n_q, d, generator=g).to(dtype)
    k = torch.randn(rows + 1, n_kv, keys + 40, d, generator=g).to(dtype)
    v = torch.randn(rows + 1, n_kv, keys + 40, d, generator=g).to(dtype)
    lengths = torch.tensor([max(1, keys - 37 * i) for i in range(rows)])
    mask = torch.arange(keys)[None, :] < lengths[:, None]
    return q, k[:rows, :, :keys], v[:rows, :, :keys], mask


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, n_q, n_kv, d, keys", [
    (1, 4, 2, 16, 37),  # the tiny models' heads, fewer keys than a chunk
    (3, 32, 4, 128, 300),  # 30B-A3B's heads: 8 query heads a kv head, a partial last chunk
    (2, 8, 8, 32, 256),  # no grouping, whole chunks
])
# 0: chunk_for's (16 for these shapes on an H100's count); 64 and 128 the 8B's at 1 and 32 rows (128: two key
# blocks a program, the online softmax rescaling inside a chunk); 256 a long context's
@pytest.mark.parametrize("chunk", [0, 16, 64, 128, 256])
def test_matches_the_plain_path(interpreted, dtype, tol, rows, n_q, n_kv, d, keys, chunk):
    q, k, v, mask = cache(rows, n_q, n_kv, d, keys, dtype)
    assert k.stride(0) != k.shape[1] * k.shape[2] * d  # a view of the slot cache, as the step reads it
    want = attend(q, k, v, mask, d ** -0.5)
    got = attend_kernels.attend(q, k, v, mask, d ** -0.5, chunk=chunk)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("rows, n_q, n_kv, d, keys, chunk", [(1, 4, 2, 16, 37, 16), (3, 32, 4, 128, 300, 16),
                                                              (2, 8, 8, 32, 256, 64), (1, 8, 2, 32, 2000, 16)])
def test_merged_by_the_last_chunk_as_by_the_merge_kernel(interpreted, monkeypatch, rows, n_q, n_kv, d, keys, chunk):
    """The merge done by the split kernel's last program of each (row, kv head) gives the merge kernel's outputs
    bit for bit (one chunk, many, more than a merge block of 64), and leaves its counters at 0: a second call (a
    CUDA graph's replay) the same."""
    q, k, v, mask = cache(rows, n_q, n_kv, d, keys, torch.bfloat16)
    assert attend_kernels.runs(q, k, v)  # the kernels themselves, not the plain path
    got = {}
    for merge in (False, True):
        monkeypatch.setattr(attend_kernels, "MERGE_IN_SPLIT", merge)
        got[merge] = [attend_kernels.attend(q, k, v, mask, d ** -0.5, chunk=chunk) for _ in range(2)]
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[True][0])
    assert not attend_kernels._counts(q.device).any()

def test_chunks_fill_the_card():
    """Chunks halve from 128 until the step makes one program a multiprocessor (132 on an H100), down to 16, and
    grow past 128 only beyond 512 chunks."""
    chunk_for = attend_kernels.chunk_for
    assert chunk_for(1, 4, 1094, 132) == 32  # 30B-A3B, batch 1: 4 kv heads x 35 chunks = 140 programs (36 at 128)
    assert chunk_for(1, 8, 1094, 132) == 64  # 8B: 8 x 18 = 144
    assert chunk_for(32, 8, 300, 132) == 128  # 32 rows: 32 x 8 x 3 = 768 already
    assert chunk_for(1, 4, 50, 132) == 16  # few keys: the smallest chunk, whatever it makes
    assert chunk_for(1, 4, 32768, 132) == 128  # 256 chunks x 4 = 1,024 programs
    assert chunk_for(1, 8, 131072, 132) == 256  # 1,024 chunks of 128 would be more than the merge takes


def test_a_key_outside_the_mask_is_never_read(interpreted):
    """Masked keys (another request's, garbage) change nothing, even huge or NaN ones: they are not read."""
    q, k, v, mask = cache(2, 4, 2, 16, 300, torch.float32)
    want = attend_kernels.attend(q, k, v, mask, 0.25)
    k, v = k.clone(), v.clone()
    k[~mask[:, None, :, None].expand_as(k)] = 1e4
    v[~mask[:, None, :, None].expand_as(v)] = float("nan")
    torch.testing.assert_close(attend_kernels.attend(q, k, v, mask, 0.25), want)


def test_compiled_around_it(interpreted):
    """Inside a compiled function with dynamic shapes (as the decode step compiles it) it stays whole."""
    q, k, v, mask = cache(2, 8, 2, 32, 200, torch.bfloat16)
    fn = torch.compile(lambda *a: attend(*a, 32 ** -0.5, split=True), dynamic=True)
    torch.testing.assert_close(fn(q, k, v, mask), attend_kernels.attend(q, k, v, mask, 32 ** -0.5))


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_without_the_interpreter_the_cpu_runs_the_plain_path():
    q, k, v, mask = cache(2, 4, 2, 16, 50, torch.float32)
    assert not attend_kernels.runs(q, k, v)
    assert torch.equal(attend_kernels.attend(q, k, v, mask, 0.25), attend(q, k, v, mask, 0.25))


def test_decode_with_split_attention_matches_generate(interpreted, tiny_moe):
    """The fast decode path attending through the kernel (the tiny MoE model, float32, both step implementations):
    the same greedy tokens as model.generate."""
    from test_fast_decode_moe import PROMPTS, _batcher, _generate_ids, _job, _run_until_done

    model, processor, _ = tiny_moe
    for impl in ("pieces", "layer"):
        job = _job(processor, PROMPTS["image"])
        want = _generate_ids(model, processor, job.prepared.inputs, 24)
        b = _batcher(model, processor, impl=impl, attention="split")
        assert b.decoder._split_attention()
        _run_until_done(b, {0: [job]})
        assert job.handle.emit_tokens == want, impl


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize("merge_in_split", [True, False])
def test_kernel_on_cuda(rows, merge_in_split, monkeypatch):
    """The compiled kernel on a GPU, bf16, 30B-A3B's heads at 1,094 keys: the plain path's outputs within bf16
    rounding, and inside a captured CUDA graph replayed over new inputs each time (a merge reading a chunk's results
    before they were stored would read the replay before's), the two-kernel merge's outputs within rounding."""
    monkeypatch.setattr(attend_kernels, "MERGE_IN_SPLIT", merge_in_split)
    q, k, v, mask = (t.cuda() for t in cache(rows, 32, 4, 128, 1094, torch.bfloat16))
    want = attend(q, k, v, mask, 128 ** -0.5)
    got = attend_kernels.attend(q, k, v, mask, 128 ** -0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = attend_kernels.attend(q, k, v, mask, 128 ** -0.5)
    for seed in range(1, 101):
        for static, new in zip((q, k, v, mask), cache(rows, 32, 4, 128, 1094, torch.bfloat16, seed=seed)):
            static.copy_(new)
        graph.replay()
        monkeypatch.setattr(attend_kernels, "MERGE_IN_SPLIT", False)
        two_kernels = attend_kernels.attend(q, k, v, mask, 128 ** -0.5)
        monkeypatch.setattr(attend_kernels, "MERGE_IN_SPLIT", merge_in_split)
        torch.testing.assert_close(captured.float(), two_kernels.float(), rtol=1e-2, atol=1e-2)
    if merge_in_split:
        assert not attend_kernels._counts(q.device).any()


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_the_decode_bench_keeps_split_attention_only_where_it_was_never_slower(monkeypatch):
    """bench/decode.py's choice: split-key attention stays on only if it was no slower at 1 row and at 32 rows; a
    chunk size of the sweep that fails to capture is recorded as failed (not as the plain timings it fell back to)
    and leaves the choice alone; a final capture that falls back reports plain."""
    from test_fast_decode_moe import _bench_decode

    bench = _bench_decode()

    class Decoder:
        is_moe, busy, attention, _split_ok, n_kv, device = False, set(), "plain", True, 8, torch.device("cpu")
        fails_at = None  # PROGRAMS_PER_SM whose captures fall back to plain attention

        def set_impl(self, impl, experts=None, attention=None):
            self.attention = attention or self.attention
            if self.attention == "split" and attend_kernels.PROGRAMS_PER_SM == self.fails_at:
                self._split_ok = False

        def _split_attention(self):
            return self.attention == "split" and self._split_ok

        def release(self, slot):
            pass

    for times, want in (({"plain": (5.0, 8.0), "split": (4.5, 7.9)}, "split"),
                        ({"plain": (5.0, 8.0), "split": (4.5, 8.2)}, "plain")):
        monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: times[d.attention][rows != 1])
        d = Decoder()
        res = bench.attention_choice(d, "layer", 1100)
        assert res["attention"] == d.attention == want
        assert res["attention_ms"]["split"]["rows32_len300"] == times["split"][1]
        sweep = res["attention_split_programs_per_sm"]  # chunks for 1, 2, 4 and 8 programs a multiprocessor
        assert [sweep[n]["chunks"] for n in (1, 2, 8)] == [[64, 128], [32, 128], [16, 64]]
        assert attend_kernels.PROGRAMS_PER_SM == 1  # restored
    split_wins = {"plain": (5.0, 8.0), "split": (4.5, 7.9)}
    monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: split_wins[d.attention][rows != 1])
    d = Decoder()
    d.fails_at = 8
    res = bench.attention_choice(d, "layer", 1100)
    assert res["attention_split_programs_per_sm"][8] == {"failed": "split-key attention failed to compile or capture "
                                                                   "with these chunks"}
    assert res["attention"] == "split" and d._split_attention()
    d = Decoder()
    d.fails_at = attend_kernels.PROGRAMS_PER_SM  # the default chunks too: the final capture falls back
    assert bench.attention_choice(d, "layer", 1100)["attention"] == "plain"
    d = Decoder()
    d._split_ok = False
    assert "attention_failed" in bench.attention_choice(d, "layer", 1100)


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_a_capture_that_fails_only_with_split_attention_turns_it_off(tiny_moe):
    """DecodeModel._capture: a step that captures with plain attention but not with split leaves split off for the
    captures after it; one that fails either way is not the kernel's fault (split stays, the experts fall back)."""
    from qvl.infer.decode import DecodeModel

    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=2, max_len=64)
    tries = []

    def capture_once(b, lb):
        tries.append((d._split_attention(), d._experts_for(b)))
        if d._split_attention():
            raise RuntimeError("split-key attention cannot be captured here")
        return ("graph", b, lb)

    d.attention, d._split_ok, d._capture_once = "split", True, capture_once
    assert d._capture(1, 128) == ("graph", 1, 128)
    assert not d._split_ok and tries == [(True, "grouped"), (False, "grouped")]

    tries.clear()
    d._split_ok = True

    def experts_at_fault(b, lb):
        tries.append((d._split_attention(), d._experts_for(b)))
        if d._experts_for(b) == "grouped":
            raise RuntimeError("grouped GEMM cannot be captured here")
        return ("graph", b, lb)

    d._capture_once = experts_at_fault
    assert d._capture(1, 128) == ("graph", 1, 128)
    assert d._split_ok and not d._grouped_ok  # split kept: plain attention failed as well
    assert tries == [(True, "grouped"), (False, "grouped"), (True, "gathered")]


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_the_decode_bench_merges_in_the_split_kernel_only_where_it_was_never_slower(monkeypatch):
    """bench/decode.py's switch choices (here the merge's): the switch stays on only if the step was no slower at
    every shape; the logits' largest difference between the two ways is reported; without split attention there is
    nothing to choose."""
    from test_fast_decode_moe import _bench_decode

    bench = _bench_decode()
    monkeypatch.setattr(attend_kernels, "MERGE_IN_SPLIT", True)

    class Decoder:
        busy, slots, split = set(), 32, True

        def _split_attention(self):
            return self.split

        def set_impl(self, impl, experts=None, attention=None, projections=None):
            pass

    monkeypatch.setattr(bench, "step_logits", lambda d, rows, keys: torch.full(
        (rows, 4), 1.0 + 0.5 * attend_kernels.MERGE_IN_SPLIT))
    for at_32, want in ((8.0, "in_split"), (8.3, "merge_kernel")):
        monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: (
            (3.6 if rows == 1 else at_32) if attend_kernels.MERGE_IN_SPLIT else (3.7 if rows == 1 else 8.2)))
        res = bench.merge_choice(Decoder(), "layer", 1100)
        assert res["merge"] == want and attend_kernels.MERGE_IN_SPLIT == (want == "in_split")
        assert res["merge_ms"]["merge_kernel"] == {"rows1_len1100": 3.7, "rows32_len300": 8.2}
        assert res["merge_max_abs_diff"] == 0.5
    d = Decoder()  # a capture that falls back to plain attention with the switch on: no timings kept, switch off
    d.set_impl = lambda impl, *a: setattr(d, "split", not attend_kernels.MERGE_IN_SPLIT)
    res = bench.merge_choice(d, "layer", 1100)
    assert res["merge"] == "merge_kernel" and "fell back" in res["merge_failed"] and res["merge_ms"] == {}
    assert not attend_kernels.MERGE_IN_SPLIT
    d = Decoder()
    d.split = False
    assert bench.merge_choice(d, "layer", 1100) == {}
