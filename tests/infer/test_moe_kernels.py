"""qvl.infer.moe_kernels: the MoE decode kernels, run by Triton's interpreter on the CPU, against the plain path's
router (qvl.infer.decode.router_top_k) and experts (the grouped GEMMs of the fast decode path).

The interpreter must be on before Triton is first imported (its own library functions are built then), so the
tests that run the kernels run in a child pytest of this file with ``TRITON_INTERPRET=1``
(:func:`test_the_kernels_under_the_interpreter`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvl.infer import moe_kernels
from qvl.infer.decode import experts_grouped, router_top_k

from test_fast_decode_moe import tiny_moe  # noqa: F401 -- a fixture (the tiny MoE checkpoint)
from triton_child import INTERPRETING, interpreted, run_under_the_interpreter  # noqa: F401 -- a fixture too

pytest.importorskip("triton")


@pytest.mark.child_pytest
@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_the_kernels_under_the_interpreter():
    run_under_the_interpreter(__file__, least_passed=42)


def weights(experts=8, hidden=64, inter=48, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(experts, hidden, generator=g).to(dtype),  # router
            (torch.randn(experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(dtype),
            (torch.randn(experts, hidden, inter, generator=g) / inter ** 0.5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows, top_k", [(1, 2), (3, 2), (2, 3), (1, 8)])
def test_route_matches_the_router(interpreted, dtype, rows, top_k):
    """A k that is not a power of two too (the kernel keeps the k picks in a padded block)."""
    router, _, _ = weights(dtype=dtype)
    h = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).to(dtype)
    want_w, want_ids = router_top_k(h, router, top_k)
    got_w, got_ids = moe_kernels.route(F.linear(h, router), top_k)
    assert torch.equal(got_ids, want_ids)
    assert got_w.dtype == want_w.dtype
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, top_k, hidden, inter", [(1, 2, 64, 48), (2, 3, 300, 40), (4, 8, 64, 272), (8, 8, 64, 48)])
def test_experts_match_the_grouped_path(interpreted, dtype, tol, rows, top_k, hidden, inter):
    """Odd sizes too: hidden and intermediate widths that are not multiples of the tiles."""
    router, gate_up, down = weights(hidden=hidden, inter=inter, dtype=dtype)
    h = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(7)).to(dtype)
    w, ids = router_top_k(h, router, top_k)
    want = experts_grouped(h, w, ids, gate_up, down)
    got = moe_kernels.experts(h, w, ids, gate_up, down)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, hidden", [(1, 64), (2, 300)])
def test_experts_with_the_norm_folded_in_match_the_norm_before(interpreted, dtype, tol, rows, hidden):
    """``norm``: the gate_up kernel RMS-normalises the residual itself (the 1-row "fused" step's way): the same as
    normalising first (qvl.infer.decode.rms_norm), on the kernels and on the plain path."""
    from qvl.infer.decode import rms_norm

    router, gate_up, down = weights(hidden=hidden, dtype=dtype)
    g = torch.Generator().manual_seed(5)
    x = (3 * torch.randn(rows, hidden, generator=g)).to(dtype)
    ln = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    h = rms_norm(x, ln, 1e-6)
    w, ids = router_top_k(h, router, 2)
    want = moe_kernels.experts(h, w, ids, gate_up, down)
    got = moe_kernels.experts(x, w, ids, gate_up, down, norm=ln, eps=1e-6)
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    plain = moe_kernels._plain_expert_outputs(h, w, ids, gate_up, down).float().sum(1).to(dtype)
    torch.testing.assert_close(got.float(), plain.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, top_k, hidden, inter, norm", [(1, 2, 64, 48, False), (2, 3, 300, 40, True),
                                                              (4, 8, 64, 272, False), (1, 8, 64, 48, True)])
def test_the_residual_added_in_the_down_kernel_matches_the_add_after(interpreted, monkeypatch, dtype, tol, rows,
                                                                     top_k, hidden, inter, norm):
    """``residual``: the down_sum kernel sums each row's k products and adds the residual itself (SUM_IN_DOWN), as
    the down kernel's products summed and added after; a k that is not a power of two, widths off the tiles."""
    router, gate_up, down = weights(hidden=hidden, inter=inter, dtype=dtype)
    g = torch.Generator().manual_seed(11)
    h, x = (torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(2))
    ln = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype) if norm else None
    w, ids = router_top_k(h, router, top_k)
    monkeypatch.setattr(moe_kernels, "SUM_IN_DOWN", True)
    got = moe_kernels.experts(h, w, ids, gate_up, down, norm=ln, eps=1e-6, residual=x)
    monkeypatch.setattr(moe_kernels, "SUM_IN_DOWN", False)
    want = x + moe_kernels.experts(h, w, ids, gate_up, down, norm=ln, eps=1e-6)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float32, 1e-5)])
# several rows (3, 3) and all 8 experts taken (1, 8); an (8, 8) case took ~90 s each under the interpreter (every
# program of every pair takes the top-k itself) for a switch that is off by default
@pytest.mark.parametrize("rows, top_k", [(1, 2), (3, 3), (1, 8)])
@pytest.mark.parametrize("norm", [False, True])
def test_routing_inside_gate_up_matches_route_then_experts(interpreted, monkeypatch, dtype, tol, rows, top_k, norm):
    """The top-k taken by the gate_up kernel's programs from the router's logits: the router's ids and weights, and
    the outputs of the route kernel followed by the experts (a k that is not a power of two too; the norm folded)."""
    from qvl.infer.decode import rms_norm

    router, gate_up, down = weights(dtype=dtype)
    h = torch.randn(rows, 64, generator=torch.Generator().manual_seed(11 + rows)).to(dtype)
    ln = (1 + 0.1 * torch.randn(64, generator=torch.Generator().manual_seed(5))).to(dtype) if norm else None
    folded = {"norm": ln, "eps": 1e-6} if norm else {}
    normed = rms_norm(h, ln, 1e-6) if norm else h
    logits = F.linear(normed, router)
    want_w, want_ids = router_top_k(normed, router, top_k)
    ids = torch.full((rows, top_k), -1, dtype=torch.int64)
    got_w = torch.zeros(rows, top_k, dtype=dtype)
    act = moe_kernels.launch_gate_up(h, ids, gate_up, logits=logits, weights=got_w, **folded)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    assert torch.equal(act, moe_kernels.launch_gate_up(h, want_ids, gate_up, **folded))
    got = {}
    for on in (True, False):  # routed in gate_up, and by the route kernel before the experts (tested above)
        monkeypatch.setattr(moe_kernels, "ROUTE_IN_GATE_UP", on)
        got[on] = [moe_kernels.routed_experts(h, logits, top_k, gate_up, down, residual=residual, **folded)
                   for residual in (None, h)]
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))
    want = moe_kernels.experts(h, want_w, want_ids, gate_up, down, **folded)  # against the grouped path: above
    torch.testing.assert_close(got[True][0].float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_without_the_interpreter_the_cpu_runs_the_plain_path():
    assert not moe_kernels.available(torch.device("cpu"))
    router, gate_up, down = weights()
    h = torch.randn(2, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    w, ids = router_top_k(h, router, 2)
    assert torch.equal(moe_kernels.route(F.linear(h, router), 2)[1], ids)
    torch.testing.assert_close(moe_kernels.experts(h, w, ids, gate_up, down).float(),
                               experts_grouped(h, w, ids, gate_up, down).float(), rtol=2e-2, atol=2e-2)
    from qvl.infer.decode import rms_norm

    ln = torch.full((64,), 1.5, dtype=torch.bfloat16)
    assert torch.equal(moe_kernels.experts(h, w, ids, gate_up, down, norm=ln, eps=1e-6),
                       moe_kernels.experts(rms_norm(h, ln, 1e-6), w, ids, gate_up, down))
    assert torch.equal(moe_kernels.routed_experts(h, F.linear(h, router), 2, gate_up, down, residual=h),
                       h + moe_kernels.experts(h, w, ids, gate_up, down))
    for in_down in (True, False):  # the op's plain path: the same as the add after
        moe_kernels.SUM_IN_DOWN, default = in_down, moe_kernels.SUM_IN_DOWN
        try:
            assert torch.equal(moe_kernels.experts(h, w, ids, gate_up, down, residual=h),
                               h + moe_kernels.experts(h, w, ids, gate_up, down))
        finally:
            moe_kernels.SUM_IN_DOWN = default


def test_compiled_around_them(interpreted):
    """Inside a compiled function (as the decode step compiles its MLP) they stay whole: same outputs."""
    router, gate_up, down = weights()
    h = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)

    def mlp(h):
        w, ids = moe_kernels.route(F.linear(h, router), 2)
        return (moe_kernels.experts(h, w, ids, gate_up, down, residual=h),
                moe_kernels.routed_experts(h, F.linear(h, router), 2, gate_up, down, residual=h))

    torch.testing.assert_close(torch.compile(mlp, dynamic=True)(h), mlp(h))


def test_decode_with_fused_experts_matches_generate(interpreted, tiny_moe):
    """The fast decode path with its MoE layers on these kernels (the tiny MoE model, float32, packed prefill and
    decode steps, both step implementations): the same greedy tokens as model.generate."""
    from test_fast_decode_moe import GREEDY, PROMPTS, _batcher, _generate_ids, _job, _run_until_done

    model, processor, _ = tiny_moe
    for impl in ("pieces", "layer"):
        job = _job(processor, PROMPTS["image"])
        want = _generate_ids(model, processor, job.prepared.inputs, GREEDY.max_new_tokens)
        b = _batcher(model, processor, experts="fused", impl=impl)
        assert b.decoder._experts_for(1) == "fused" and b.decoder._experts_for(4) == "fused"
        _run_until_done(b, {0: [job]})
        assert job.handle.emit_tokens == want, impl


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 4, 8])
def test_kernels_on_cuda(rows, monkeypatch):
    """The compiled kernels on a GPU, bf16, a 30B-A3B layer's widths (fewer experts) and top-8: the same ids and
    weights as the router, outputs as the grouped GEMM's within bf16 rounding, and inside a captured CUDA graph."""
    dev = torch.device("cuda")
    router, gate_up, down = (t.to(dev) for t in weights(experts=32, hidden=2048, inter=768))
    h = torch.randn(rows, 2048, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(dev)
    want_w, want_ids = router_top_k(h, router, 8)
    got_w, got_ids = moe_kernels.route(F.linear(h, router), 8)
    assert torch.equal(got_ids, want_ids)
    torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-2)
    want = experts_grouped(h, want_w, want_ids, gate_up, down)
    got = moe_kernels.experts(h, want_w, want_ids, gate_up, down)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    from qvl.infer.decode import rms_norm

    ln = (1 + 0.1 * torch.randn(2048, generator=torch.Generator().manual_seed(4))).to(torch.bfloat16).to(dev)
    folded = moe_kernels.experts(h, want_w, want_ids, gate_up, down, norm=ln, eps=1e-6)
    normed_first = moe_kernels.experts(rms_norm(h, ln, 1e-6), want_w, want_ids, gate_up, down)
    torch.testing.assert_close(folded.float(), normed_first.float(), rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(moe_kernels, "SUM_IN_DOWN", True)  # the down_sum kernel
    added = moe_kernels.experts(h, want_w, want_ids, gate_up, down, residual=h)
    torch.testing.assert_close(added.float(), (h + got).float(), rtol=2e-2, atol=2e-2)
    logits = F.linear(h, router)
    ids, routed_w = torch.empty_like(want_ids), torch.empty_like(want_w)
    moe_kernels.launch_gate_up(h, ids, gate_up, logits=logits, weights=routed_w)  # the top-k in the gate_up kernel
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(routed_w, want_w, rtol=0, atol=1e-2)
    routed = moe_kernels.routed_outputs(h, logits, 8, gate_up, down)  # (B, k, H): each pair's product
    torch.testing.assert_close(routed.float().sum(dim=1).to(h.dtype).float(), got.float(), rtol=2e-2, atol=2e-2)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe_kernels.experts(h, want_w, want_ids, gate_up, down)
        captured_added = moe_kernels.experts(h, want_w, want_ids, gate_up, down, residual=h)
        captured_routed = moe_kernels.routed_outputs(h, logits, 8, gate_up, down)
    graph.replay()
    torch.testing.assert_close(captured, got)
    torch.testing.assert_close(captured_added, added)
    torch.testing.assert_close(captured_routed, routed)
