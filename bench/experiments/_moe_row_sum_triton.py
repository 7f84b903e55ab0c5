"""The MoE down kernel as qvl.infer._moe_triton had it until 2026-12-06, for moe_kernel_tune.py's comparison: one
program per row and block of hidden columns summed the row's k pairs in turn (a module of its own, without postponed
annotations, whose global ``tl`` Triton's interpreter can patch)."""

import triton.language as tl


def down_row_sum_kernel(act_ptr, ids_ptr, weights_ptr, w_ptr, out_ptr, H, INTER, stride_we, stride_wh, stride_out,
                        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = row * TOP_K + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        rows = w_ptr + expert * stride_we + cols[:, None] * stride_wh
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, INTER, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            k_ok = ks < INTER
            a = tl.load(act_ptr + pair * INTER + ks, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            w = tl.load(rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * a, 1)
        total += (acc.to(dtype).to(tl.float32) * weight).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, total.to(dtype), mask=col_ok)
