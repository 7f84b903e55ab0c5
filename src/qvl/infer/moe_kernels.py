"""A mixture-of-experts layer's decode for a few rows in three Triton kernels: the router's top-k, and the routed
experts reading only the rows of the experts each token picked.

The 30B-A3B batch-1 decode step took 7.02 ms against its 2.0 ms bandwidth bound (H100, 2026-12-05,
bench/experiments/results/moe_decode_step_h100.txt): 1,587 kernels, 33 a layer. The routing alone was 144 kernels
(softmax, top-k, the grouped path's sort and search: 0.74 ms), the experts' grouped GEMM read its 3.6 GB at ~51 % of
the card's bandwidth (2.36 ms) and the sort's index, scatter and copies took 0.58 ms more. Here, a layer's MoE half is
the router's GEMM (cuBLAS) and:

* :func:`route` — softmax (float32) over the experts, top-k, the k weights renormalised and cast back, as the
  Hugging Face router computes them (qvl.infer.decode.router_top_k): one program a row;
* :func:`experts` — per (row, expert) pair, ``silu(x @ gate^T) * (x @ up^T)`` (one program per pair and block of
  intermediate columns), then per row and block of hidden columns ``sum_k w_k * (act_k @ down_k^T)``. The values are
  rounded where the plain path rounds them (each product to the model's dtype, the k-sum accumulated in float32), so
  outputs match it up to the order of the dot products' sums. Each pair reads its expert's rows whole: with many
  rows sharing experts the grouped GEMM (each selected expert read once) reads less, so this is for a few rows.

Both are custom ops (``qvl::moe_route``, ``qvl::moe_experts``): torch.compile leaves them whole and CUDA graphs
capture their launches. On a CPU they run the plain path's operations, except under ``TRITON_INTERPRET=1``, where
Triton's interpreter runs the kernels themselves (tests/infer/test_moe_kernels.py compares the two).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

# tile sizes: a block of output columns by a block of the reduced dimension, one program each, and its warps. The
# fastest at 1 row of the 30B-A3B shape (the size the decoder fuses by default): 40 us a layer's experts against 62
# with 16 x 256 and 4 warps, 91 for the grouped GEMM (H100, 2026-12-06, bench/experiments/moe_kernel_tune.py,
# bench/experiments/results/moe_kernel_tune_h100.json; at 4 and 8 rows 16 x 256 with 8 warps was fastest). The
# gathered experts alone took 36 us there: the fused step wins by its route kernel and fewer launches (decode.py)
BLOCK_OUT = 8
BLOCK_IN = 128
NUM_WARPS = 8


@functools.cache
def _triton():
    """(triton, triton.language), or None where Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    return triton, tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernels run on ``device``: CUDA with Triton (or Triton's interpreter on a CPU)."""
    return _triton() is not None and (torch.device(device).type == "cuda" or interpreting())


@functools.cache
def _kernels():
    """(triton, route, gate_up, down): the kernels of qvl.infer._moe_triton, jitted now (so Triton's interpreter, if
    asked for by then, runs them)."""
    import triton

    from qvl.infer import _moe_triton as k

    return triton, triton.jit(k.route_kernel), triton.jit(k.gate_up_kernel), triton.jit(k.down_kernel)


def _on(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream): the tensors' own."""
    import contextlib

    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _plain_route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(logits.dtype), ids


def _plain_experts(h, weights, ids, gate_up, down) -> torch.Tensor:
    b, k = ids.shape
    flat = ids.reshape(-1)
    x = h.repeat_interleave(k, dim=0)
    gate, up = torch.bmm(gate_up[flat], x[:, :, None])[:, :, 0].chunk(2, dim=-1)
    act = F.silu(gate) * up
    y = torch.bmm(down[flat], act[:, :, None])[:, :, 0]
    return (y * weights.reshape(-1, 1)).view(b, k, -1).float().sum(dim=1).to(h.dtype)


@torch.library.custom_op("qvl::moe_route", mutates_args=())
def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, E) -> (weights (B, k) in logits' dtype, expert ids (B, k) int64), largest first."""
    if not available(logits.device) or logits.shape[-1] & (logits.shape[-1] - 1):  # E a power of two (tl.arange)
        return _plain_route(logits, top_k)
    triton, route_kernel, _, _ = _kernels()
    logits = logits.contiguous()
    b, e = logits.shape
    weights = torch.empty(b, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(b, top_k, dtype=torch.int64, device=logits.device)
    with _on(logits.device):
        route_kernel[(b,)](logits, weights, ids, logits.stride(0), E=e, TOP_K=top_k)
    return weights, ids


@route.register_fake
def _(logits, top_k):
    b = logits.shape[0]
    return logits.new_empty(b, top_k), logits.new_empty(b, top_k, dtype=torch.int64)


@torch.library.custom_op("qvl::moe_experts", mutates_args=())
def experts(h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate_up: torch.Tensor,
            down: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted sum for each row: h (B, H), weights / ids (B, k), gate_up (E, 2I, H), down
    (E, H, I) -> (B, H)."""
    if not available(h.device) or gate_up.stride(-1) != 1 or down.stride(-1) != 1:
        return _plain_experts(h, weights, ids, gate_up, down)
    triton, _, gate_up_kernel, down_kernel = _kernels()
    h, weights, ids = h.contiguous(), weights.contiguous(), ids.contiguous()
    b, k = ids.shape
    hidden, inter = h.shape[1], down.shape[2]
    act = torch.empty(b * k, inter, dtype=h.dtype, device=h.device)
    out = torch.empty_like(h)
    with _on(h.device):
        gate_up_kernel[(b * k, triton.cdiv(inter, BLOCK_OUT))](
            h, ids, gate_up, act, hidden, inter, h.stride(0), gate_up.stride(0), gate_up.stride(1),
            TOP_K=k, BLOCK_N=BLOCK_OUT, BLOCK_K=BLOCK_IN, num_warps=NUM_WARPS)
        down_kernel[(b, triton.cdiv(hidden, BLOCK_OUT))](
            act, ids, weights, down, out, hidden, inter, down.stride(0), down.stride(1), out.stride(0),
            TOP_K=k, BLOCK_N=BLOCK_OUT, BLOCK_K=BLOCK_IN, num_warps=NUM_WARPS)
    return out


@experts.register_fake
def _(h, weights, ids, gate_up, down):
    return torch.empty_like(h)
