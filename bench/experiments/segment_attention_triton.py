"""An experiment that lost, kept so its numbers can be reproduced: full (non-causal) attention inside each segment
of a packed row, forward only, in Triton, for the frozen vision tower's heads of 72 dimensions.

The idea: torch's flash kernel has templates for 64 and 96 dimensions, so 72 runs the 96 one and a quarter of its
matmul work is padding. This kernel splits the head dimension into a power-of-two part and a 16-wide rest
(72 = 64 + 16 with 8 zero columns: 10 % padding) and keeps flash attention's online softmax.

What it measured (1 x H200, torch 2.11, Triton 3.6, 2026-11-28, results/vision_attention.json; 16 steps of the throughput bench's images and
frames, 27 blocks each): flash varlen 16.1 ms per step, this kernel 25.9 ms at its best blocks (128 x 64, 8 warps,
3 stages), 28.4 ms with 4 warps. Less work, but two matmuls per key block (K = 64 and K = 16) run far below flash's
efficiency. Chaining the two score matmuls or adding them (``sum_dots``), and loading K transposed or transposing it
in registers (``k_transposed``), all timed within 0.1 ms of each other. The tower keeps torch's flash varlen.
``bench/experiments/vision_attention.py --kernels flash,triton`` times the two.

Triton 3.6 on the H200 faulted on the kernel's first form (2026-11-28): compute-sanitizer saw shared-memory reads
out of range for every block shape with 128 rows; 64 x 64 blocks gave wrong values. That form also handled heads
without a rest (``if HAS_REST`` constexpr branches) and ended idle blocks with an early ``return``; removing only the
early return did not help, this form (the rest always there, no such branches) runs right at 128 x 64 and 128 x 32.
The cause was not isolated further. 64 x 64 blocks with 4 warps still give NaN on a one-patch segment here. It runs
under Triton's CPU interpreter (``TRITON_INTERPRET=1``) too.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


def _split_head_dim(head_dim: int) -> tuple[int, int]:
    """(power-of-two part, padded rest) of a head dimension: 72 -> (64, 16), 80 -> (64, 16), 40 -> (32, 16)."""
    first = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - first
    return first, (max(16, 1 << (rest - 1).bit_length()) if rest else 0)


@triton.jit
def _attend_block(acc0, acc1, m_i, l_i, q0, q1, kp0, kp1, vp0, vp1, n0, length, qk_scale, stride_kl, stride_vl, offs_n,
                  d1_mask, MASK_N: tl.constexpr, SUM: tl.constexpr, KT: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_N block of keys and values for a BLOCK_M block of queries (online softmax, base 2)."""
    cols = n0 + offs_n
    keep = cols < length
    if KT:  # pointers are (D, BN)
        if MASK_N:
            k0 = tl.load(kp0 + n0 * stride_kl, mask=keep[None, :], other=0.0)
            k1 = tl.load(kp1 + n0 * stride_kl, mask=keep[None, :] & d1_mask[:, None], other=0.0)
        else:
            k0 = tl.load(kp0 + n0 * stride_kl)
            k1 = tl.load(kp1 + n0 * stride_kl, mask=d1_mask[:, None], other=0.0)
    else:
        if MASK_N:
            k0 = tl.trans(tl.load(kp0 + n0 * stride_kl, mask=keep[:, None], other=0.0))
            k1 = tl.trans(tl.load(kp1 + n0 * stride_kl, mask=keep[:, None] & d1_mask[None, :], other=0.0))
        else:
            k0 = tl.trans(tl.load(kp0 + n0 * stride_kl))
            k1 = tl.trans(tl.load(kp1 + n0 * stride_kl, mask=d1_mask[None, :], other=0.0))
    if SUM:
        s = tl.dot(q0, k0, input_precision=PRECISION) + tl.dot(q1, k1, input_precision=PRECISION)
    else:
        s = tl.dot(q0, k0, input_precision=PRECISION)
        s = tl.dot(q1, k1, s, input_precision=PRECISION)
    s = s * qk_scale
    if MASK_N:
        s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASK_N:
        v0 = tl.load(vp0 + n0 * stride_vl, mask=keep[:, None], other=0.0)
        v1 = tl.load(vp1 + n0 * stride_vl, mask=keep[:, None] & d1_mask[None, :], other=0.0)
    else:
        v0 = tl.load(vp0 + n0 * stride_vl)
        v1 = tl.load(vp1 + n0 * stride_vl, mask=d1_mask[None, :], other=0.0)
    p = p.to(v0.dtype)
    if SUM:
        acc0 = acc0 * alpha[:, None] + tl.dot(p, v0, input_precision=PRECISION)
        acc1 = acc1 * alpha[:, None] + tl.dot(p, v1, input_precision=PRECISION)
    else:
        acc0 = tl.dot(p, v0, acc0 * alpha[:, None], input_precision=PRECISION)
        acc1 = tl.dot(p, v1, acc1 * alpha[:, None], input_precision=PRECISION)
    return acc0, acc1, m_new, l_i


@triton.jit
def _segment_attention_kernel(Q, K, V, O, CU, qk_scale, stride_ql, stride_qh, stride_kl, stride_kh, stride_vl,
                              stride_vh, stride_ol, stride_oh, HEAD_DIM: tl.constexpr, D0: tl.constexpr,
                              D1: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SUM: tl.constexpr,
                              KT: tl.constexpr, PRECISION: tl.constexpr):
    """One BLOCK_M block of one segment's queries, one head: online softmax over the segment's keys."""
    block, segment, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(CU + segment)
    length = tl.load(CU + segment + 1) - start
    if block * BLOCK_M < length:  # the grid is sized by the longest segment
        offs_m = block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        offs_d1 = D0 + tl.arange(0, D1)
        d1_mask = offs_d1 < HEAD_DIM
        row_mask = offs_m < length
        q_base = Q + start * stride_ql + head * stride_qh
        k_base = K + start * stride_kl + head * stride_kh
        v_base = V + start * stride_vl + head * stride_vh
        q0 = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d0[None, :], mask=row_mask[:, None], other=0.0)
        q1 = tl.load(q_base + offs_m[:, None] * stride_ql + offs_d1[None, :],
                     mask=row_mask[:, None] & d1_mask[None, :], other=0.0)
        if KT:
            kp0 = k_base + offs_n[None, :] * stride_kl + offs_d0[:, None]
            kp1 = k_base + offs_n[None, :] * stride_kl + offs_d1[:, None]
        else:
            kp0 = k_base + offs_n[:, None] * stride_kl + offs_d0[None, :]
            kp1 = k_base + offs_n[:, None] * stride_kl + offs_d1[None, :]
        vp0 = v_base + offs_n[:, None] * stride_vl + offs_d0[None, :]
        vp1 = v_base + offs_n[:, None] * stride_vl + offs_d1[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        full = length // BLOCK_N * BLOCK_N
        for n0 in range(0, full, BLOCK_N):  # whole blocks: no masks
            acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, kp0, kp1, vp0, vp1, n0, length,
                                                 qk_scale, stride_kl, stride_vl, offs_n, d1_mask, False, SUM, KT,
                                                 PRECISION)
        if full < length:  # the segment's last, partial block
            acc0, acc1, m_i, l_i = _attend_block(acc0, acc1, m_i, l_i, q0, q1, kp0, kp1, vp0, vp1, full, length,
                                                 qk_scale, stride_kl, stride_vl, offs_n, d1_mask, True, SUM, KT,
                                                 PRECISION)
        o_base = O + start * stride_ol + head * stride_oh
        l_i = l_i[:, None]
        tl.store(o_base + offs_m[:, None] * stride_ol + offs_d0[None, :], (acc0 / l_i).to(O.dtype.element_ty),
                 mask=row_mask[:, None])
        tl.store(o_base + offs_m[:, None] * stride_ol + offs_d1[None, :], (acc1 / l_i).to(O.dtype.element_ty),
                 mask=row_mask[:, None] & d1_mask[None, :])


# (BLOCK_M, BLOCK_N, warps, stages): the fastest measured on an H200
BLOCKS = (128, 64, 8, 3)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int,
           scale: float | None = None, blocks: tuple[int, int, int, int] | None = None, sum_dots: bool = False,
           k_transposed: bool = False) -> torch.Tensor:
    """softmax(q k^T x scale) v inside each segment ``cu[i]:cu[i+1]``: (L, H, D) q, k, v (last dim contiguous, D not
    a power of two) and int32 ``cu`` in, (L, H, D) out. ``longest``: at least the longest segment (sizes the grid)."""
    length, heads, head_dim = q.shape
    d0, d1 = _split_head_dim(head_dim)
    if not d1 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"needs q, k, v of one shape (L, H, D), D not a power of two: {q.shape} {k.shape} {v.shape}")
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if length == 0:
        return out
    block_m, block_n, warps, stages = blocks or BLOCKS
    scale = head_dim ** -0.5 if scale is None else scale
    grid = (triton.cdiv(int(longest), block_m), cu.numel() - 1, heads)
    _segment_attention_kernel[grid](
        q, k, v, out, cu, scale * math.log2(math.e), q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0),
        v.stride(1), out.stride(0), out.stride(1), HEAD_DIM=head_dim, D0=d0, D1=d1, BLOCK_M=block_m,
        BLOCK_N=block_n, SUM=sum_dots, KT=k_transposed, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=stages)
    return out
