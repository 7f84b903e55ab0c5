"""The Triton kernel of qvl.infer.gemv_kernels (read its notes), as a plain function: ``gemv_kernels`` jits it when
first used. A module of its own, without postponed annotations, whose global ``tl`` Triton's interpreter can
patch."""

import triton.language as tl


def gemv_kernel(x_ptr, w_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # one program per block of output columns of the one row: its rows of the weight read once; products summed in
    # float32 and rounded once, as a bf16 matmul rounds
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w_rows = w_ptr + cols[:, None].to(tl.int64) * K
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = tl.load(x_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[None, :], 1)
    tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
