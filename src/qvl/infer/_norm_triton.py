"""The RMS norm's pieces inside qvl's Triton kernels (qvl.infer._gemv_triton, _moe_triton, _qk_triton), rounded where
qvl.infer.decode.rms_norm (Qwen3VLTextRMSNorm's operations) rounds. Imported, and so jitted, only where a kernel
module is: when its kernels are first used (Triton's interpreter, if asked for by then, runs them)."""

import triton
import triton.language as tl


@triton.jit
def rms_scale(row_ptr, K, eps, BLOCK_K: tl.constexpr):
    """1 / sqrt(mean of the row's squares + eps), the squares summed in float32."""
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        x = tl.load(row_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
        squares += x * x
    return tl.rsqrt(tl.sum(squares, 0) / K + eps)


@triton.jit
def normed(x, scale, weight, dtype: tl.constexpr):
    """x (float32) scaled, rounded to ``dtype``, times the norm's weight, rounded again: float32 values."""
    x = (x * scale).to(dtype).to(tl.float32)
    return (weight.to(tl.float32) * x).to(dtype).to(tl.float32)
