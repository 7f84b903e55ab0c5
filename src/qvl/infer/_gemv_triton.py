"""The Triton kernel of qvl.infer.gemv_kernels (read its notes), as a plain function: ``gemv_kernels`` jits it when
first used. A module of its own, without postponed annotations, whose global ``tl`` Triton's interpreter can
patch."""

import triton.language as tl

from qvl.infer._launch_triton import let_next_start, wait_for_previous
from qvl.infer._norm_triton import normed, rms_scale


def gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, N, K, eps, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    # one program per block of output columns of the one row: its rows of the weight read once; products summed in
    # float32 and rounded once, as a bf16 matmul rounds. NORM: x is first RMS-normalised and scaled by norm_ptr's
    # weight, rounded where Qwen3VLTextRMSNorm rounds (each program sums x's squares itself: x is one row, in cache).
    # RESIDUAL: res_ptr's row added to the rounded product, as the decoder's residual add. PDL: the weight's first
    # block is read while the kernel before still runs (no kernel writes weights); x and the rest after it ended
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dtype = out_ptr.dtype.element_ty
    let_next_start(PDL)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K
    ks = tl.arange(0, BLOCK_K)
    w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    wait_for_previous(PDL)
    if NORM:
        scale = rms_scale(x_ptr, K, eps, BLOCK_K)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        if NORM:
            x = normed(x, scale, tl.load(norm_ptr + ks, mask=k_ok, other=0.0), dtype)
        acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
        ks += BLOCK_K  # the next block, read ahead (none past K: masked off)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    out = acc.to(dtype)
    if RESIDUAL:
        out = (out.to(tl.float32) + tl.load(res_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)).to(dtype)
    tl.store(out_ptr + cols, out, mask=col_ok)
