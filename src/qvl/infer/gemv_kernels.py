"""The decode step's projections for a few rows (``x @ w^T``, x (B <= MAX_ROWS, K), w (N, K)) as one Triton kernel.

At 1 row, cuBLAS ran 30B-A3B's attention projections (q/k/v 2,048 -> 5,120, o 4,096 -> 2,048) and router in its
64 x 8 tiles: 80 and 32 programs for an H100's 132 multiprocessors, o_proj as split-K plus a reduce, ~31 us a layer
for their 38 MB, ~40 % of the card's bandwidth (2026-12-06, bench/experiments/results/moe_decode_step_fused_down_h100.txt).
The experts' kernels of the same step (:mod:`qvl.infer.moe_kernels`), a program per block of 8 output columns,
read at 79-86 %. :func:`gemv` is that shape for a plain weight: a program per block of output columns reads its
weight rows once for every row of x (float32 sums, one rounding, as a bf16 matmul). A custom op
(``qvl::gemv``): torch.compile leaves it whole and CUDA graphs capture its launch. Where it does not run
(:func:`runs`) :func:`linear` is ``F.linear``; tests/infer/test_gemv_kernels.py compares the two under Triton's
interpreter.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qvl.infer.triton_support import available, on_device

MAX_ROWS = 8  # the fused experts' default limit (qvl.infer.decode.EXPERTS_FUSED_MAX_ROWS): the steps it serves
TILE = (8, 256, 8)  # (output columns, reduced block, warps) a program: the experts' gate_up tile at the same width


@functools.cache
def _kernel():
    import triton

    from qvl.infer import _gemv_triton as k

    return triton, triton.jit(k.gemv_kernel)


def runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`gemv` takes ``x @ w^T``: Triton on x's device, at most MAX_ROWS rows, one dtype, w's rows
    contiguous."""
    return (available(x.device) and x.dim() == 2 and x.shape[0] <= MAX_ROWS and w.dim() == 2
            and x.dtype == w.dtype and w.stride(-1) == 1)


@torch.library.custom_op("qvl::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (B, K), w (N, K) -> x @ w^T (B, N) in x's dtype."""
    triton, kernel = _kernel()
    x = x.contiguous()
    rows, k = x.shape
    n = w.shape[0]
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = TILE
    with on_device(x.device):
        kernel[(triton.cdiv(n, block_n),)](x, w, out, n, k, x.stride(0), w.stride(0), out.stride(0), ROWS=rows,
                                           ROWS_PAD=triton.next_power_of_2(rows), BLOCK_N=block_n,
                                           BLOCK_K=block_k, num_warps=warps)
    return out


@gemv.register_fake
def _(x, w):
    return x.new_empty(x.shape[0], w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, small: bool = False) -> torch.Tensor:
    """``F.linear(x, w)``; through :func:`gemv` when ``small`` (the decoder's choice for this step) and it runs."""
    if small and runs(x, w):
        return gemv(x, w)
    return F.linear(x, w)
