"""qvl.infer.gemv_kernels: the 1-row projection kernel, run by Triton's interpreter on the CPU (in a child pytest
with ``TRITON_INTERPRET=1``, as tests/infer/test_moe_kernels.py), against ``F.linear``; the decoder's choice of it
(``projections``) and its fall-back when a capture with it fails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvl.infer import gemv_kernels
from qvl.infer.decode import PROJECTIONS, DecodeModel

from test_fast_decode_moe import tiny_moe  # noqa: F401 -- a fixture (the tiny MoE checkpoint)
from triton_child import INTERPRETING, interpreted, run_under_the_interpreter  # noqa: F401 -- a fixture too

pytest.importorskip("triton")


@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_the_kernel_under_the_interpreter():
    run_under_the_interpreter(__file__, least_passed=10)


def _pair(rows: int, n: int, k: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g).to(dtype), (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n, k", [(64, 256), (37, 300), (130, 1500), (16, 2048)])
def test_gemv_matches_linear(interpreted, dtype, tol, n, k):
    """Widths that are not multiples of the tile too."""
    x, w = _pair(1, n, k, dtype)
    assert gemv_kernels.runs(x, w)
    got = gemv_kernels.gemv(x, w)
    want = F.linear(x, w)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_compiled_around_it_and_only_where_it_runs(interpreted):
    """Inside a compiled function (the decode step compiles its layers) it stays whole: no graph break, same outputs.
    More than one row, or a weight that is not contiguous, go to F.linear."""
    x, w = _pair(1, 48, 64, torch.bfloat16)
    torch.testing.assert_close(torch.compile(lambda a: gemv_kernels.linear(a, w, True), dynamic=True,
                                             fullgraph=True)(x), gemv_kernels.gemv(x, w))
    assert not gemv_kernels.runs(torch.zeros(2, 64, dtype=torch.bfloat16), w)
    assert not gemv_kernels.runs(x, w.t().contiguous().t())
    assert not gemv_kernels.runs(x.float(), w)


def test_decode_with_gemv_projections_matches_generate(interpreted, tiny_moe, monkeypatch):
    """The fast decode path with its 1-row steps' projections on the kernel (the MoE default; the tiny MoE model,
    float32, grouped and fused experts): the kernel runs, and the greedy tokens are model.generate's."""
    from test_fast_decode_moe import GREEDY, PROMPTS, _batcher, _generate_ids, _job, _run_until_done

    model, processor, _ = tiny_moe
    calls, kernel = [], gemv_kernels.gemv
    monkeypatch.setattr(gemv_kernels, "gemv", lambda x, w: calls.append(tuple(w.shape)) or kernel(x, w))
    for experts in ("grouped", "fused"):
        job = _job(processor, PROMPTS["image"])
        want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
        b = _batcher(model, processor, experts=experts)
        assert b.decoder.projections == "gemv" and b.decoder._gemv_for(1) and not b.decoder._gemv_for(2)
        calls.clear()
        _run_until_done(b, {0: [job]})
        assert job.handle.emit_tokens == want, experts
        assert len(calls) >= 2 * len(b.decoder.layers), experts  # q/k/v and o of every layer, each step


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_projections_run_the_kernel_where_asked_and_it_runs(tiny_moe):
    """"gemv" (a MoE model's default, measured faster on 30B-A3B): the kernel for 1-row steps; "cublas" (a dense
    model's): never; never where Triton does not run (this CPU without the interpreter), where linear is F.linear."""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=16, max_len=64)
    assert PROJECTIONS == d.projections == "gemv" and not d._gemv_ok and not d._gemv_for(1)
    x, w = _pair(1, 8, 16, torch.float32)
    assert torch.equal(gemv_kernels.linear(x, w, True), F.linear(x, w))
    d._gemv_ok = True  # as on a GPU with Triton
    assert [d._gemv_for(n) for n in (1, 2, 8)] == [True, False, False]
    d.set_impl(d.impl, projections="cublas")
    assert not d._gemv_for(1)
    with pytest.raises(ValueError, match="projections"):
        d.set_impl("pieces", projections="fast")
    assert d.impl == "layer" and d.projections == "cublas"  # a refused change changes nothing


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_a_dense_model_keeps_cublas_by_default(tiny):
    """The kernel was measured faster inside a step on 30B-A3B only: a dense model's steps stay on cuBLAS unless
    asked (docs/serve.md's set_impl)."""
    model, _ = tiny
    d = DecodeModel(model, slots=2, max_len=64)
    d._gemv_ok = True  # as on a GPU with Triton
    assert d.projections == "cublas" and not d._gemv_for(1)
    d.set_impl(d.impl, projections="gemv")
    assert d._gemv_for(1)


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_a_capture_that_fails_with_the_kernel_goes_on_without_it(tiny_moe, monkeypatch):
    """A step whose capture fails with the projections' kernel and succeeds without it: the kernel is off for the
    captures from then on, the experts keep their way (the capture is stubbed: the bookkeeping is what is
    checked)."""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=8, max_len=256)
    d._gemv_ok = d._fused_ok = True
    d.set_impl(d.impl, projections="gemv")
    d._graphs, d._pool = {(4, 128): "kept"}, "pool"

    def capture_once(b, lb):
        if d._gemv_for(b):
            raise RuntimeError("triton: out of resources")
        d._graphs[(b, lb)] = f"captured-{b}"
        return d._graphs[(b, lb)]

    monkeypatch.setattr(d, "_capture_once", capture_once)
    assert d._gemv_for(1)
    assert d._capture(1, 128) == "captured-1"
    assert not d._gemv_ok and d._fused_ok and d._experts_for(1) == "fused"
    assert set(d._graphs) == {(4, 128), (1, 128)} and d._pool == "pool"


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_the_decode_bench_keeps_the_kernel_only_where_it_was_never_slower(monkeypatch):
    """bench/decode.py's choice: the GEMV kernel stays only if its 1-row step was no slower; a capture that fell back
    to cuBLAS is reported as such, not as the kernel's timings; one turned off by an earlier capture is timed again;
    where Triton does not run, cuBLAS, said so."""
    from test_fast_decode_moe import _bench_decode

    bench = _bench_decode()
    monkeypatch.setattr(gemv_kernels, "available", lambda device: True)  # as on a GPU

    class Decoder:
        busy, projections, _gemv_ok, fails, device = set(), "gemv", True, False, torch.device("cpu")

        def set_impl(self, impl, experts=None, attention=None, projections=None):
            self.projections = projections or self.projections
            if self.projections == "gemv" and self.fails:
                self._gemv_ok = False

        def release(self, slot):
            pass

    for times, want in (({"cublas": 4.3, "gemv": 4.1}, "gemv"), ({"cublas": 4.3, "gemv": 4.4}, "cublas")):
        monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: times[d.projections])
        d = Decoder()
        res = bench.projections_choice(d, "layer", 1100)
        assert res["projections"] == d.projections == want
        assert res["projections_ms"]["gemv"]["rows1_len1100"] == times["gemv"]
    d = Decoder()
    d.fails = True
    res = bench.projections_choice(d, "layer", 1100)
    assert res["projections"] == "cublas" and "gemv" not in res["projections_ms"]
    assert "failed to compile or capture" in res["projections_failed"]
    d = Decoder()
    d._gemv_ok = False  # an earlier capture (another way's) turned it off: timed again, and it wins
    monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: {"cublas": 4.3, "gemv": 4.1}[d.projections])
    assert bench.projections_choice(d, "layer", 1100)["projections"] == "gemv"
    monkeypatch.setattr(gemv_kernels, "available", lambda device: False)
    res = bench.projections_choice(Decoder(), "layer", 1100)
    assert res["projections"] == "cublas" and "does not run here" in res["projections_failed"]


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k", [(5120, 2048), (2048, 4096), (128, 2048), (6144, 4096)])
def test_gemv_on_cuda(n, k):
    """bf16 at 30B-A3B's projection widths (q/k/v, o, router) and 8B's q/k/v: F.linear's values within bf16 rounding,
    and the same inside a captured CUDA graph."""
    x, w = (t.cuda() for t in _pair(1, n, k, torch.bfloat16, seed=n))
    got = gemv_kernels.gemv(x, w)
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv_kernels.gemv(x, w)
    graph.replay()
    torch.testing.assert_close(captured, got)
