"""qvl.infer.qk_kernels: the q/k norms, RoPE and cache write of a decode step in one kernel, run by Triton's
interpreter on the CPU (a child pytest with ``TRITON_INTERPRET=1``, as tests/infer/test_moe_kernels.py), against
the plain path's operations (qvl.infer.decode.attn_in's and layer_step's cache writes)."""

from __future__ import annotations

import pytest
import torch

from qvl.infer import qk_kernels
from qvl.infer.decode import rms_norm, rotate

from triton_child import INTERPRETING, interpreted, run_under_the_interpreter  # noqa: F401 -- a fixture too

pytest.importorskip("triton")


@pytest.mark.child_pytest
@pytest.mark.skipif(INTERPRETING, reason="this is the child")
def test_the_kernel_under_the_interpreter():
    run_under_the_interpreter(__file__, least_passed=5)


def _inputs(rows: int, n_q: int, n_kv: int, d: int, dtype, device="cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = (2 * torch.randn(rows, (n_q + 2 * n_kv) * d, generator=g)).to(dtype)
    qn, kn = ((1 + 0.1 * torch.randn(d, generator=g)).to(dtype) for _ in range(2))
    angles = torch.rand(rows, d // 2, generator=g) * 50
    emb = torch.cat((angles, angles), dim=-1)
    return [t.to(device) for t in (qkv, qn, kn, emb.cos().to(dtype), emb.sin().to(dtype))]


def _plain(qkv, qn, kn, cos, sin, n_q, n_kv, eps):
    b, d = qkv.shape[0], qn.shape[0]
    q, k, v = qkv.split((n_q * d, n_kv * d, n_kv * d), dim=-1)
    return (rotate(rms_norm(q.view(b, n_q, d), qn, eps), cos, sin),
            rotate(rms_norm(k.view(b, n_kv, d), kn, eps), cos, sin), v.view(b, n_kv, d))


def _check(rows, n_q, n_kv, d, dtype, tol, device="cpu"):
    qkv, qn, kn, cos, sin = _inputs(rows, n_q, n_kv, d, dtype, device)
    slots, length = rows + 2, 40
    k_cache = torch.full((slots, n_kv, length, d), 7.0, dtype=dtype, device=device)
    v_cache = k_cache.clone()
    pos = torch.tensor([3 + 11 * i for i in range(rows)], device=device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = qk_kernels.qk_rope_write(qkv, qn, kn, cos, sin, k_cache, v_cache, pos, n_q, 1e-6)
    want_q, want_k, want_v = _plain(qkv, qn, kn, cos, sin, n_q, n_kv, 1e-6)
    torch.testing.assert_close(q.float(), want_q.float(), rtol=tol, atol=tol)
    rows_ = torch.arange(rows, device=device)
    torch.testing.assert_close(k_cache[rows_, :, pos].float(), want_k.float(), rtol=tol, atol=tol)
    assert torch.equal(v_cache[rows_, :, pos], want_v)  # v is copied as it is
    written = torch.zeros(slots, length, dtype=torch.bool, device=device)
    written[rows_, pos] = True
    for cache, before in ((k_cache, before_k), (v_cache, before_v)):  # nothing else in the cache changed
        assert torch.equal(cache.permute(0, 2, 1, 3)[~written], before.permute(0, 2, 1, 3)[~written])


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 5e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rows, n_q, n_kv, d", [(1, 4, 2, 16), (3, 8, 2, 32)])
def test_q_and_the_cache_match_the_plain_path(interpreted, dtype, tol, rows, n_q, n_kv, d):
    """Several rows, each writing at its own position; grouped-query heads. bf16 within a few roundings (Triton's
    interpreter rounds to bf16 toward zero, the plain path to nearest)."""
    _check(rows, n_q, n_kv, d, dtype, tol)


@pytest.mark.skipif(INTERPRETING, reason="the parent runs it")
def test_without_triton_on_the_device_the_plain_path_runs():
    """This CPU without the interpreter: the same function computes the plain path (exactly the plain ops)."""
    cache = torch.zeros(1, 1, 4, 4)
    assert not qk_kernels.runs(torch.zeros(1, 8), torch.ones(4), torch.ones(4), cache, cache)
    _check(2, 4, 2, 16, torch.bfloat16, 0)


def test_compiled_around_it_the_cache_is_written_in_place(interpreted):
    """Inside a compiled function (the decode step compiles its layers) it stays whole and writes the caches
    themselves, which the same graph then reads."""
    qkv, qn, kn, cos, sin = _inputs(1, 4, 2, 16, torch.float32)
    caches = [torch.zeros(2, 2, 8, 16) for _ in range(4)]
    pos = torch.tensor([5])

    def step(k_cache, v_cache):
        q = qk_kernels.qk_rope_write(qkv, qn, kn, cos, sin, k_cache, v_cache, pos, 4, 1e-6)
        return q.sum() + k_cache[:1, :, :6].sum() + v_cache[:1, :, :6].sum()

    got = torch.compile(step, dynamic=True, fullgraph=True)(caches[0], caches[1])
    want = step(caches[2], caches[3])
    torch.testing.assert_close(got, want)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3]) and caches[0].abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETING, reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows, n_q, n_kv", [(1, 32, 4), (4, 32, 8)])
def test_on_cuda(rows, n_q, n_kv):
    """bf16 at 30B-A3B's (32 q, 4 kv heads) and 8B's (8 kv) head counts, 128 wide: within bf16 rounding."""
    _check(rows, n_q, n_kv, 128, torch.bfloat16, 2e-2, "cuda")


def test_a_compiled_fused_layer_writes_the_cache_in_place_and_matches_the_plain_layer(interpreted):
    """qvl.infer.decode.layer_step compiled with "fused" (the folded norms and adds, this kernel) against the plain
    eager layer: same output and caches, and inductor's code copies no cache (the write stays in place)."""
    from torch._inductor.utils import run_and_get_code

    from qvl.infer.decode import layer_step

    g = torch.Generator().manual_seed(0)
    hidden, n_q, n_kv, d, inter = 64, 4, 2, 16, 96

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    x = rand(1, hidden)
    ln1, ln2, qn, kn = (1 + 0.1 * rand(n) for n in (hidden, hidden, d, d))
    wqkv, wo = rand((n_q + 2 * n_kv) * d, hidden, scale=0.1), rand(hidden, n_q * d, scale=0.1)
    mlp = (rand(2 * inter, hidden, scale=0.1), rand(hidden, inter, scale=0.1))
    emb = torch.cat([rand(1, d // 2)] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    pos, rows = torch.tensor([5]), torch.arange(1)
    mask = torch.arange(8)[None, :] <= pos[:, None]
    caches = [rand(2, n_kv, 8, d) for _ in range(2)]
    plain_caches = [c.clone() for c in caches]

    def layer(small, k_cache, v_cache):
        return layer_step(x, ln1, wqkv, qn, kn, wo, ln2, mlp, k_cache, v_cache, rows, pos, mask, cos, sin, n_q, n_kv,
                          1e-6, d ** -0.5, small=small)

    got, codes = run_and_get_code(torch.compile(layer, dynamic=True), "fused", *caches)
    want = layer("cublas", *plain_caches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for c, p in zip(caches, plain_caches):
        torch.testing.assert_close(c, p, rtol=1e-4, atol=1e-4)
    code = "\n".join(codes)
    assert "qk_rope_write" in code and "clone" not in code and ".copy_(" not in code
