"""The Triton kernel of qvl.infer.qk_kernels (read its notes), as a plain function: ``qk_kernels`` jits it when
first used. A module of its own, without postponed annotations, whose global ``tl`` Triton's interpreter can
patch."""

import triton.language as tl

from qvl.infer._launch_triton import let_next_start, wait_for_previous
from qvl.infer._norm_triton import normed


def qk_rope_write_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, v_ptr, eps,
                         stride_qkv, stride_cos, stride_sin, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh,
                         stride_vl, N_Q: tl.constexpr, N_KV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr):
    # one program per (row, head) of the q and k heads: the head RMS-normalised and scaled by its norm's weight, then
    # rotated (RoPE), each value rounded where the plain path's operations round it; a q head goes to q_ptr, a k head
    # to its cache at the row's position, with the matching v head beside it. PDL: the next kernel may start at
    # once; this one reads after the one before ended
    let_next_start(PDL)
    wait_for_previous(PDL)
    row = tl.program_id(0)
    head = tl.program_id(1)
    dtype = q_ptr.dtype.element_ty
    ds = tl.arange(0, D)
    turned = (ds + D // 2) % D  # rotate_half: (-x[D/2:], x[:D/2])
    sign = tl.where(ds < D // 2, -1.0, 1.0)
    row = row.to(tl.int64)  # cache offsets can pass 2**31 elements
    at = qkv_ptr + row * stride_qkv + head * D
    x = tl.load(at + ds).to(tl.float32)
    x_turned = tl.load(at + turned).to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, 0) / D + eps)
    if head < N_Q:
        weight = tl.load(qn_ptr + ds)
        weight_turned = tl.load(qn_ptr + turned)
    else:
        weight = tl.load(kn_ptr + ds)
        weight_turned = tl.load(kn_ptr + turned)
    x = normed(x, scale, weight, dtype)
    x_turned = normed(x_turned, scale, weight_turned, dtype)
    cos = tl.load(cos_ptr + row * stride_cos + ds).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_sin + ds).to(tl.float32)
    out = ((x * cos).to(dtype).to(tl.float32) + (sign * x_turned * sin).to(dtype).to(tl.float32)).to(dtype)
    if head < N_Q:
        tl.store(q_ptr + (row * N_Q + head) * D + ds, out)
    else:
        kv = head - N_Q
        pos = tl.load(pos_ptr + row).to(tl.int64)
        tl.store(k_ptr + row * stride_kb + kv * stride_kh + pos * stride_kl + ds, out)
        v = tl.load(qkv_ptr + row * stride_qkv + (N_Q + N_KV + kv) * D + ds)
        tl.store(v_ptr + row * stride_vb + kv * stride_vh + pos * stride_vl + ds, v)
