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


@pytest.mark.child_pytest
@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_the_kernel_under_the_interpreter():
    run_under_the_interpreter(__file__, least_passed=18)


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


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("norm, residual", [(True, False), (False, True), (True, True)])
def test_the_norm_and_residual_folded_in_match_the_plain_path(interpreted, dtype, tol, norm, residual):
    """``norm``: x RMS-normalised and scaled in the kernel, as qvl.infer.decode.rms_norm before F.linear;
    ``residual``: added to the product, as the decoder's residual add. Odd widths."""
    from qvl.infer.decode import rms_norm

    x, w = _pair(1, 37, 300, dtype)
    g = torch.Generator().manual_seed(3)
    ln = (1 + 0.1 * torch.randn(300, generator=g)).to(dtype) if norm else None
    res = torch.randn(1, 37, generator=g).to(dtype) if residual else None
    want = F.linear(rms_norm(x, ln, 1e-6) if norm else x, w)
    want = res + want if residual else want
    got = gemv_kernels.gemv(x, w, ln, 1e-6, res)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    plain = gemv_kernels.linear(x, w, False, ln, 1e-6, res)  # the plain path linear() takes where it does not run
    torch.testing.assert_close(got.float(), plain.float(), rtol=tol, atol=tol)


def test_compiled_around_it_and_only_where_it_runs(interpreted):
    """Inside a compiled function (the decode step compiles its layers) it stays whole: no graph break, same outputs.
    More than one row, or a weight that is not contiguous, go to F.linear."""
    x, w = _pair(1, 48, 64, torch.bfloat16)
    torch.testing.assert_close(torch.compile(lambda a: gemv_kernels.linear(a, w, True), dynamic=True,
                                             fullgraph=True)(x), gemv_kernels.gemv(x, w))
    assert not gemv_kernels.runs(torch.zeros(2, 64, dtype=torch.bfloat16), w)
    assert not gemv_kernels.runs(x, w.t().contiguous().t())
    assert not gemv_kernels.runs(x.float(), w)


def _counting(monkeypatch, module, name: str) -> list:
    """Count the calls of ``module.name`` (a kernel's custom op): the list of their first arguments' shapes."""
    calls, kernel = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(tuple(a[1].shape)) or kernel(*a, **kw))
    return calls


@pytest.mark.parametrize("way", ["gemv", "fused"])
def test_decode_with_gemv_projections_matches_generate(interpreted, tiny_moe, monkeypatch, way):
    """The fast decode path with its 1-row steps' projections on the kernel, and "fused" with the norms, residual
    adds and q/k RoPE + cache write in kernels too (the tiny MoE model, float32, grouped and fused experts, both
    step implementations): the kernels run, and the greedy tokens are model.generate's."""
    from qvl.infer import qk_kernels
    from test_fast_decode_moe import GREEDY, PROMPTS, _batcher, _generate_ids, _job, _run_until_done

    model, processor, _ = tiny_moe
    calls = _counting(monkeypatch, gemv_kernels, "gemv")
    qk_calls = _counting(monkeypatch, qk_kernels, "_qk_rope_write")
    for experts, impl in (("grouped", "layer"), ("fused", "layer"), ("fused", "pieces")):
        job = _job(processor, PROMPTS["image"])
        want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
        b = _batcher(model, processor, experts=experts, impl=impl, projections=way)
        assert b.decoder._projections_for(1) == way and b.decoder._projections_for(2) == "cublas"
        calls.clear(), qk_calls.clear()
        _run_until_done(b, {0: [job]})
        assert job.handle.emit_tokens == want, (experts, impl)
        assert len(calls) >= 2 * len(b.decoder.layers), experts  # q/k/v and o of every layer, each step
        assert bool(qk_calls) == (way == "fused" and impl == "layer"), (experts, impl)


def test_a_dense_decode_with_fused_projections_matches_generate(interpreted, tiny, monkeypatch):
    """"fused" on the tiny dense model: its MLP's projections through the kernel too (norm and residual folded);
    greedy tokens as model.generate's."""
    from test_fast_decode import GREEDY, _Collect, _generate_ids, _job, _run_until_done

    from qvl.data.packing import rope_index_fn
    from qvl.infer.continuous import ContinuousBatcher
    from qvl.models.tokens import token_ids

    model, processor = tiny
    calls = _counting(monkeypatch, gemv_kernels, "gemv")
    decoder = DecodeModel(model, slots=2, max_len=512, compile=False)
    decoder.set_impl("layer", projections="fused")
    b = ContinuousBatcher(decoder, _Collect, token_ids(processor.tokenizer).pad, rope_index_fn(model),
                          coalesce_s=0.0)
    job = _job(processor, ["describe the red circle in detail"])
    want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
    _run_until_done(b, {0: [job]})
    assert job.handle.emit_tokens == want
    assert len(calls) >= 4 * len(decoder.layers)  # q/k/v, o, gate_up and down of every layer, each step


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_projections_run_the_kernel_where_asked_and_it_runs(tiny_moe):
    """"fused" (the default, measured fastest on 30B-A3B and 8B): the kernels for 1-row steps; "cublas": never;
    never where Triton does not run (this CPU without the interpreter), where linear is F.linear."""
    model, _, _ = tiny_moe
    d = DecodeModel(model, slots=16, max_len=64)
    assert PROJECTIONS == d.projections == "fused" and d._projections_for(1) == "cublas" and not d._gemv_ok
    x, w = _pair(1, 8, 16, torch.float32)
    assert torch.equal(gemv_kernels.linear(x, w, True), F.linear(x, w))
    d._gemv_ok = True  # as on a GPU with Triton
    assert [d._projections_for(n) for n in (1, 2, 8)] == [PROJECTIONS, "cublas", "cublas"]
    d.set_impl(d.impl, projections="cublas")
    assert d._projections_for(1) == "cublas"
    with pytest.raises(ValueError, match="projections"):
        d.set_impl("pieces", projections="fast")
    assert d.impl == "layer" and d.projections == "cublas"  # a refused change changes nothing


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_a_dense_model_fuses_its_1_row_steps_too(tiny):
    """Measured fastest on 8B too (6.09 against 6.57 ms a step with cuBLAS): a dense model's 1-row steps run
    "fused" by default; docs/serve.md's set_impl turns it back."""
    model, _ = tiny
    d = DecodeModel(model, slots=2, max_len=64)
    d._gemv_ok = True  # as on a GPU with Triton
    assert d.projections == "fused" and d._projections_for(1) == "fused" and d._projections_for(2) == "cublas"
    d.set_impl(d.impl, projections="cublas")
    assert d._projections_for(1) == "cublas"


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
        if d._projections_for(b) != "cublas":
            raise RuntimeError("triton: out of resources")
        d._graphs[(b, lb)] = f"captured-{b}"
        return d._graphs[(b, lb)]

    monkeypatch.setattr(d, "_capture_once", capture_once)
    assert d._projections_for(1) == "gemv"
    assert d._capture(1, 128) == "captured-1"
    assert not d._gemv_ok and d._fused_ok and d._experts_for(1) == "fused"
    assert set(d._graphs) == {(4, 128), (1, 128)} and d._pool == "pool"
    # "fused" whose folded kernels fail: the step steps down to the GEMV alone, not to cuBLAS
    d._gemv_ok, d._graphs = True, {}
    d.set_impl(d.impl, projections="fused")
    monkeypatch.setattr(d, "_capture_once", lambda b, lb: (_ for _ in ()).throw(RuntimeError("qk kernel"))
                        if d._projections_for(b) == "fused" else f"captured-{d._projections_for(b)}")
    assert d._capture(1, 128) == "captured-gemv"
    assert d._gemv_ok and not d._fold_ok and d._projections_for(1) == "gemv"


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_the_decode_bench_keeps_the_kernel_only_where_it_was_never_slower(monkeypatch):
    """bench/decode.py's choice: the GEMV kernel stays only if its 1-row step was no slower; a capture that fell back
    to cuBLAS is reported as such, not as the kernel's timings; one turned off by an earlier capture is timed again;
    where Triton does not run, cuBLAS, said so."""
    from test_fast_decode_moe import _bench_decode

    bench = _bench_decode()
    monkeypatch.setattr(gemv_kernels, "available", lambda device: True)  # as on a GPU

    class Decoder:
        busy, projections, _gemv_ok, _fold_ok, fails, device = set(), "gemv", True, True, (), torch.device("cpu")

        def set_impl(self, impl, experts=None, attention=None, projections=None):
            self.projections = projections or self.projections
            if self.projections in self.fails:
                self._gemv_ok = False

        def _projections_for(self, rows):
            return self.projections if self._gemv_ok else "cublas"

        def release(self, slot):
            pass

    for times, want in (({"cublas": 4.3, "gemv": 4.1, "fused": 3.9}, "fused"),
                        ({"cublas": 4.3, "gemv": 4.1, "fused": 4.1}, "fused"),  # a tie: the kernel way
                        ({"cublas": 4.3, "gemv": 4.1, "fused": 4.2}, "gemv"),
                        ({"cublas": 4.3, "gemv": 4.4, "fused": 4.5}, "cublas")):
        monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: times[d.projections])
        d = Decoder()
        res = bench.projections_choice(d, "layer", 1100)
        assert res["projections"] == d.projections == want and d._gemv_ok
        assert res["projections_ms"]["fused"]["rows1_len1100"] == times["fused"]
    monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: {"cublas": 4.3, "gemv": 4.1,
                                                                        "fused": 3.9}[d.projections])
    d = Decoder()
    d.fails = ("fused",)  # its capture fell back to cuBLAS: not timed as itself, the next fastest kept
    res = bench.projections_choice(d, "layer", 1100)
    assert res["projections"] == "gemv" and "fused" not in res["projections_ms"] and d._gemv_ok
    assert "fused: failed to compile or capture (the decoder used cublas)" in res["projections_failed"]
    d = Decoder()
    d._gemv_ok = False  # an earlier capture (another way's) turned it off: timed again, and it wins
    assert bench.projections_choice(d, "layer", 1100)["projections"] == "fused"
    monkeypatch.setattr(gemv_kernels, "available", lambda device: False)
    res = bench.projections_choice(Decoder(), "layer", 1100)
    assert res["projections"] == "cublas" and "does not run here" in res["projections_failed"]


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_launches_overlap_only_where_the_card_and_triton_take_it(monkeypatch):
    """Programmatic dependent launch: on a CUDA card that has it (compute capability 9+, a Triton with the
    instructions), while the switch is on; never on a CPU or under Triton's interpreter."""
    from qvl.infer import _launch_triton, triton_support

    monkeypatch.setattr(triton_support, "LAUNCH_OVERLAP", True)
    assert triton_support.overlap(torch.device("cpu")) == {"PDL": False}
    card_takes_it = triton_support._overlaps.__wrapped__
    monkeypatch.setattr(triton_support, "_overlaps", lambda index: True)  # as on an H100
    cuda = torch.device("cuda", 0)
    assert triton_support.overlap(cuda) == {"PDL": True, "launch_pdl": True}
    monkeypatch.setattr(triton_support, "LAUNCH_OVERLAP", False)
    assert triton_support.overlap(cuda) == {"PDL": False}
    monkeypatch.setattr(triton_support, "LAUNCH_OVERLAP", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_support.overlap(cuda) == {"PDL": False}
    monkeypatch.setattr(_launch_triton, "gdc_wait", None)  # a Triton before 3.4
    assert not card_takes_it(0)


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_a_capture_that_fails_with_overlapped_launches_goes_on_without_them(tiny_moe, monkeypatch):
    """Overlapped launches are the first thing a failed capture drops (the folds and the GEMV stay), for the process
    (the kernels read one switch)."""
    from qvl.infer import triton_support

    model, _, _ = tiny_moe
    monkeypatch.setattr(triton_support, "LAUNCH_OVERLAP", True)
    monkeypatch.setattr(triton_support, "overlap", lambda device: {"PDL": triton_support.LAUNCH_OVERLAP})
    d = DecodeModel(model, slots=8, max_len=256)
    d._gemv_ok = True
    d.set_impl(d.impl, projections="fused")

    def capture_once(b, lb):
        if triton_support.LAUNCH_OVERLAP:
            raise RuntimeError("CUDA error: operation not supported when stream is capturing")
        return f"captured-{d._projections_for(b)}"

    monkeypatch.setattr(d, "_capture_once", capture_once)
    assert d._overlap_ok and d._capture(1, 128) == "captured-fused"
    assert not d._overlap_ok and not triton_support.LAUNCH_OVERLAP and d._fold_ok and d._gemv_ok


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_the_decode_bench_overlaps_launches_only_with_equal_logits_and_no_loss(monkeypatch):
    """bench/decode.py's choice: overlapped launches stay where the step's logits equal the serial step's and it was
    never slower; different logits (a kernel read too early) or a capture that fell back keep them serial."""
    from test_fast_decode_moe import _bench_decode

    from qvl.infer import triton_support

    bench = _bench_decode()
    monkeypatch.setattr(triton_support, "LAUNCH_OVERLAP", True)
    monkeypatch.setattr(triton_support, "overlap", lambda device: {"PDL": triton_support.LAUNCH_OVERLAP})

    class Decoder:
        busy, device, fails, differ = set(), torch.device("cpu"), False, False
        _overlap_ok = property(lambda self: triton_support.LAUNCH_OVERLAP,
                               lambda self, on: setattr(triton_support, "LAUNCH_OVERLAP", on))

        def set_impl(self, impl, experts=None, attention=None, projections=None):
            if self.fails and self._overlap_ok:
                self._overlap_ok = False

        def release(self, slot):
            pass

    def logits(d, rows, keys):
        return torch.full((rows, 4), 1.0 + (d.differ and d._overlap_ok))

    monkeypatch.setattr(bench, "step_logits", logits)
    for overlapped, want in ((3.5, "overlapped"), (3.8, "serial")):
        monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: overlapped if d._overlap_ok else 3.7)
        res = bench.overlap_choice(Decoder(), "layer", 1100)
        assert res["launch_overlap"] == want and triton_support.LAUNCH_OVERLAP == (want == "overlapped")
        assert res["launch_overlap_same_logits"] and res["launch_overlap_ms"]["serial"]["rows1_len1100"] == 3.7
    monkeypatch.setattr(bench, "graph_step_ms", lambda d, rows, keys: 3.5 if d._overlap_ok else 3.7)
    d = Decoder()
    d.differ = True
    res = bench.overlap_choice(d, "layer", 1100)
    assert res["launch_overlap"] == "serial" and not triton_support.LAUNCH_OVERLAP
    assert res["launch_overlap_same_logits"] is False and res["launch_overlap_max_abs_diff"] == 1.0
    d = Decoder()
    d.fails = True
    res = bench.overlap_choice(d, "layer", 1100)
    assert res["launch_overlap"] == "serial" and "failed to capture" in res["launch_overlap_failed"]
    assert "overlapped" not in res["launch_overlap_ms"]
    monkeypatch.setattr(triton_support, "overlap", lambda device: {"PDL": False})  # a card before Hopper
    assert "no programmatic dependent launch" in bench.overlap_choice(Decoder(), "layer", 1100)[
        "launch_overlap_failed"]


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
def test_overlapped_launches_in_a_graph_match_serial_ones():
    """A chain of GEMVs, each reading the one before (norm and residual folded in), captured with overlapped
    launches: the same values as captured serially (on a card without programmatic dependent launch both are
    serial)."""
    from qvl.infer import triton_support

    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(2048, 2048, generator=g) / 45).to(torch.bfloat16).cuda() for _ in range(8)]
    ln = torch.ones(2048, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, 2048, generator=g).to(torch.bfloat16).cuda()
    outs, default = {}, triton_support.LAUNCH_OVERLAP
    for on in (False, True):
        triton_support.LAUNCH_OVERLAP = on
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = x
                for w in ws:
                    y = gemv_kernels.gemv(y, w, ln, 1e-6, y)
            graph.replay()
            outs[on] = y.clone()
        finally:
            triton_support.LAUNCH_OVERLAP = default
    assert torch.equal(outs[True], outs[False])


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
@pytest.mark.parametrize("n, k", [(5120, 2048), (2048, 4096), (128, 2048), (6144, 4096)])
def test_gemv_on_cuda(n, k):
    """bf16 at 30B-A3B's projection widths (q/k/v, o, router) and 8B's q/k/v: F.linear's values within bf16 rounding,
    with the norm and the residual folded in too, and the same inside a captured CUDA graph."""
    from qvl.infer.decode import rms_norm

    x, w = (t.cuda() for t in _pair(1, n, k, torch.bfloat16, seed=n))
    got = gemv_kernels.gemv(x, w)
    torch.testing.assert_close(got.float(), F.linear(x, w).float(), rtol=2e-2, atol=2e-2)
    ln = (1 + 0.1 * torch.randn(k, generator=torch.Generator().manual_seed(k))).to(torch.bfloat16).cuda()
    res = torch.randn(1, n, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).cuda()
    torch.testing.assert_close(gemv_kernels.gemv(x, w, ln, 1e-6, res).float(),
                               (res + F.linear(rms_norm(x, ln, 1e-6), w)).float(), rtol=2e-2, atol=3e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv_kernels.gemv(x, w)
    graph.replay()
    torch.testing.assert_close(captured, got)
