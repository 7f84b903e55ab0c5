"""A decode step's attention input after its q/k/v projection, in one Triton kernel: the per-head q and k norms,
RoPE, and the new key and value written into the cache.

Compiled, the plain path (qvl.infer.decode.attn_in and the cache writes of ``layer_step``) took three kernels a layer
of 1.8-1.9 us each in the 30B-A3B batch-1 step, q's norm and rotation, k's, and the cache write (H100, 2026-12-06,
bench/experiments/results/moe_decode_step_diverse_h100.txt): here one program per (row, q or k head) does its head,
a k head's program also copies the matching v head. Values are rounded where the plain path's eager operations round
them (the norm as Qwen3VLTextRMSNorm, each product of the rotation), so q and the cache match it up to the order of
the squares' sum (tests/infer/test_qk_kernels.py).

A custom op (``qvl::qk_rope_write``, mutating the caches in place): torch.compile leaves it whole and CUDA graphs
capture its launch. Where it does not run (:func:`runs`) :func:`qk_rope_write` is the plain path.
"""

from __future__ import annotations

import functools

import torch

from qvl.infer.triton_support import available, on_device, overlap

NUM_WARPS = 1  # a program is one head of 128 values: one warp's


@functools.cache
def _kernel():
    import triton

    from qvl.infer import _qk_triton as k

    return triton.jit(k.qk_rope_write_kernel)


def runs(qkv: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the kernel takes this step: Triton on the device, a power-of-two head width (tl.arange), heads
    contiguous in the caches and the norms, one dtype."""
    d = k_cache.shape[-1]
    return (available(qkv.device) and d & (d - 1) == 0 and qkv.stride(-1) == 1
            and all(t.stride(-1) == 1 and t.dtype == qkv.dtype for t in (qn, kn, k_cache, v_cache)))


@torch.library.custom_op("qvl::qk_rope_write", mutates_args=("k_cache", "v_cache"))
def _qk_rope_write(qkv: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, n_q: int,
                   eps: float) -> torch.Tensor:
    kernel = _kernel()
    b, d, n_kv = qkv.shape[0], k_cache.shape[-1], k_cache.shape[1]
    q = torch.empty(b, n_q, d, dtype=qkv.dtype, device=qkv.device)
    cos, sin, pos = cos.contiguous(), sin.contiguous(), pos.contiguous()
    with on_device(qkv.device):
        kernel[(b, n_q + n_kv)](
            qkv, qn, kn, cos, sin, pos, q, k_cache, v_cache, eps, qkv.stride(0), cos.stride(0), sin.stride(0),
            *k_cache.stride()[:3], *v_cache.stride()[:3], N_Q=n_q, N_KV=n_kv, D=d, num_warps=NUM_WARPS,
            **overlap(qkv.device))
    return q


@_qk_rope_write.register_fake
def _(qkv, qn, kn, cos, sin, k_cache, v_cache, pos, n_q, eps):
    return qkv.new_empty(qkv.shape[0], n_q, k_cache.shape[-1])


def qk_rope_write(qkv: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, n_q: int,
                  eps: float) -> torch.Tensor:
    """qkv (B, (Hq + 2 Hkv) * D) the rows' fused projection; qn / kn (D,) the q / k norms' weights; cos / sin (B, D);
    caches (slots, Hkv, L, D), row i being slot i; pos (B,) where each row's new key and value go -> q (B, Hq, D)
    normalised and rotated, the k heads (normalised, rotated) and v heads written into the caches."""
    if runs(qkv, qn, kn, k_cache, v_cache):
        return _qk_rope_write(qkv, qn, kn, cos, sin, k_cache, v_cache, pos, n_q, eps)
    from qvl.infer.decode import rms_norm, rotate

    b, d, n_kv = qkv.shape[0], k_cache.shape[-1], k_cache.shape[1]
    q, k, v = qkv.split((n_q * d, n_kv * d, n_kv * d), dim=-1)
    q = rotate(rms_norm(q.view(b, n_q, d), qn, eps), cos, sin)
    rows = torch.arange(b, device=qkv.device)
    k_cache[rows, :, pos] = rotate(rms_norm(k.view(b, n_kv, d), kn, eps), cos, sin)
    v_cache[rows, :, pos] = v.view(b, n_kv, d)
    return q
