"""The decode step's projections at one row (``x @ w^T``, x (1, K), w (N, K) contiguous) as one Triton kernel.

At 1 row cuBLAS ran 30B-A3B's attention projections (q/k/v 2,048 -> 5,120, o 4,096 -> 2,048) and router in 64 x 8
tiles: 80 and 32 programs for an H100's 132 multiprocessors, o_proj as split-K plus a reduce
(bench/experiments/results/moe_decode_step_fused_down_h100.txt). Here a program per block of 8 output columns reads
its weight rows in blocks of 1,024 (float32 sums, one rounding, as a bf16 matmul): 9.9 / 9.0 / 2.7 us against
cuBLAS's 9.9 / 10.7 / 4.8 for those three, 8B's q/k/v and o 20.5 / 14.1 against 20.9 / 16.3 (H100, 2026-12-06,
48 weights each replayed in a CUDA graph: bench/experiments/gemv_tiles.py, results/gemv_tiles_h100.json). Several
rows read the weight once per row here: a step of more rows stays on cuBLAS. The decoder's "fused" way
(qvl.infer.decode.PROJECTIONS) folds more into the kernel: the RMS norm of the row it reads (each program sums the
row's squares itself; the rounding is the norm's) and the residual add after it, so a layer's norm and add kernels
go. A custom op (``qvl::gemv``):
torch.compile leaves it whole and CUDA graphs capture its launch. Where it does not run (:func:`runs`) :func:`linear`
is ``F.linear``; tests/infer/test_gemv_kernels.py compares the two under Triton's interpreter.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from qvl.infer.triton_support import available, on_device, overlap

MAX_ROWS = 1  # steps of more rows stay on cuBLAS (an earlier multi-row kernel with an 8 x 256 tile took 21.8 ms a
# 30B-A3B 8-row step against 14.3: bench/experiments/results/decode_moe_gemv_narrow_tile_h100.json)
TILE = (8, 1024, 8)  # (output columns, reduced block, warps) a program: best or within 0.6 us of it on the five shapes


@functools.cache
def _kernel():
    import triton

    from qvl.infer import _gemv_triton as k

    return triton, triton.jit(k.gemv_kernel)


def runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`gemv` takes ``x @ w^T``: Triton on x's device, one row, one dtype, w contiguous."""
    return (available(x.device) and x.dim() == 2 and x.shape[0] == MAX_ROWS and w.dim() == 2
            and x.shape[1] == w.shape[1] and x.dtype == w.dtype and w.is_contiguous())


@torch.library.custom_op("qvl::gemv", mutates_args=())
def gemv(x: torch.Tensor, w: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 0.0,
         residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (1, K), w (N, K) -> x @ w^T (1, N) in x's dtype. ``norm`` (K,): x RMS-normalised (``eps``) and scaled by it
    first, as :func:`qvl.infer.decode.rms_norm`; ``residual`` (1, N): added to the product. ``w`` must be a weight no
    kernel writes (a model's): with overlapped launches (qvl.infer.triton_support.overlap) its first block is read
    before the kernel before this one has ended."""
    triton, kernel = _kernel()
    x = x.contiguous()
    n, k = w.shape
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    block_n, block_k, warps = TILE
    with on_device(x.device):
        kernel[(triton.cdiv(n, block_n),)](
            x, w, out, x if norm is None else norm, x if residual is None else residual.contiguous(), n, k, eps,
            NORM=norm is not None, RESIDUAL=residual is not None, BLOCK_N=block_n, BLOCK_K=block_k,
            num_warps=warps, **overlap(x.device))
    return out


@gemv.register_fake
def _(x, w, norm=None, eps=0.0, residual=None):
    return x.new_empty(1, w.shape[0])


def linear(x: torch.Tensor, w: torch.Tensor, small: bool = False, norm: torch.Tensor | None = None,
           eps: float = 0.0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(rms_norm(x, norm, eps), w)`` (without ``norm``: x as it is; without ``residual``: the
    product alone); through :func:`gemv` in one kernel when ``small`` (the decoder's choice for this step) and it
    runs, else as the plain decode path computes it."""
    if small and runs(x, w) and all(t is None or t.dtype == x.dtype for t in (norm, residual)):
        return gemv(x, w, norm, eps, residual)
    if norm is not None:
        from qvl.infer.decode import rms_norm

        x = rms_norm(x, norm, eps)
    y = F.linear(x, w)
    return y if residual is None else residual + y
