"""The loss head: lm_head + cross-entropy in row chunks, and the few row counts its matmuls meet.

* :func:`linear_cross_entropy` — lm_head + cross-entropy in row chunks, gradients computed in the forward
  pass: the full ``tokens x vocabulary`` logits tensor (and its fp32 copy and gradient) never exists
  (``fused_cross_entropy``).
* :func:`gemm_rows` — a row count rounded up to one of a few sizes (``gemm_row_multiple``), so the loss head's
  matmuls (and the vision tower's, whose patches :mod:`qvl.train.row_forward` pads to the same ladder) meet few
  shapes across steps; :func:`warm_loss_head` runs the head at each of them before training.

Tested on CPU against the plain path (tests/train/test_speed.py); measured effects are in docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvl.plan.memory import CE_CHUNK_BYTES  # rows x vocabulary logits per chunk (compute dtype + fp32); the planner counts it


def add_product_fp32(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b`` for 16-bit ``a``, ``b`` into an fp32 ``total``. On a GPU the matmul adds into ``total``
    itself (cuBLAS with an fp32 output): a full fine-tuning head's weight gradient (vocabulary x hidden, 2.5 GB in
    fp32 at 8B) is then read and written once per chunk, instead of a 16-bit product written, copied to fp32 and
    added (about twice the memory traffic and two more kernels; bench/experiments/liger_levers.py --train-head)."""
    if total.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and hasattr(torch.ops.aten.addmm, "dtype_out"):
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total += (a @ b).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); gradients made chunk by chunk in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, row_multiple: int = 0):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s:s + chunk], target[s:s + chunk]
                n = h.shape[0]
                if row_multiple > 1 and n % row_multiple:  # zero rows: the matmuls' shapes repeat across steps
                    h = F.pad(h, (0, 0, 0, row_multiple - n % row_multiple))
                logits = (h @ weight.t()).float()  # rounded to the compute dtype first, as lm_head(h).float() is
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse[:n] - logits[:n].gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[n:] = 0.0  # padding rows: no gradient
                probs[torch.arange(n, device=t.device), t] -= 1.0
                g = probs.to(h.dtype)
                if need_h:
                    grad_h[s:s + n] = (g @ weight)[:n]
                if need_w:
                    add_product_fp32(grad_w, g.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def gemm_rows(n: int, multiple: int) -> int:
    """``n`` rows rounded up to one of a few sizes (``gemm_row_multiple``): every multiple of ``multiple`` up to
    15 of them, then 8 sizes per doubling (so at most 1/8 more rows). Why a ladder, not every multiple: a step's
    patch count ranges over thousands, so a plain multiple still meets a new matmul shape almost every step, and the
    first time cuBLAS meets a shape it holds the host until the GPU is idle (``bench/experiments/kernel_loading.py``)."""
    if multiple <= 1:
        return n
    k = -(-n // multiple)
    step = 1 << max(0, k.bit_length() - 4)
    return -(-k // step) * step * multiple


def gemm_multiple_for(choice, device: torch.device, engine: str = "ddp") -> int:
    """``gemm_row_multiple`` resolved: ``auto`` is 128 on a GPU under one process or DDP (8B LoRA on an H100: +1.9 %
    tokens/s, 2026-11-28, the levers in bench/results/train_throughput.json; the warm-up takes the tower's compilation the first steps took), else
    0; a number is itself."""
    if choice != "auto":
        return int(choice)
    return 128 if device.type == "cuda" and engine == "ddp" else 0


def gemm_ladder(most: int, multiple: int) -> list[int]:
    """Every size :func:`gemm_rows` gives for 1 to ``most`` rows, ascending."""
    sizes, n = [], 1
    while multiple > 1 and n <= most:
        sizes.append(gemm_rows(n, multiple))
        n = sizes[-1] + 1
    return sizes


def loss_chunk_rows(vocab: int, element_size: int, row_multiple: int = 0, chunk: int | None = None) -> tuple[int, int]:
    """(rows per chunk, row multiple) of :func:`linear_cross_entropy`'s chunks for a ``vocab``-row head computed in
    ``element_size``-byte floats: as many rows as ``CE_CHUNK_BYTES`` of logits hold (unless ``chunk``); with
    ``row_multiple`` a multiple of it (at most one chunk)."""
    if chunk is None:
        chunk = max(16, CE_CHUNK_BYTES // (vocab * (4 + element_size)))
    if row_multiple > 1:  # within the chunk's memory (the planner counts CE_CHUNK_BYTES): at most one chunk's rows
        row_multiple = min(row_multiple, chunk)
        chunk = chunk // row_multiple * row_multiple
    return chunk, row_multiple


def warm_loss_head(weight: torch.Tensor, row_multiple: int, most_rows: int) -> int:
    """Run :func:`linear_cross_entropy` (gradient included) once at each chunk shape it can meet with
    ``row_multiple`` for up to ``most_rows`` label rows (under the caller's autocast), so that training meets none
    for the first time. Returns how many shapes."""
    device_type = weight.device.type
    size = (torch.get_autocast_dtype(device_type).itemsize if torch.is_autocast_enabled(device_type)
            else weight.element_size())
    chunk, multiple = loss_chunk_rows(weight.shape[0], size, row_multiple)
    if multiple <= 1:
        return 0
    sizes = range(multiple, min(chunk, -(-most_rows // multiple) * multiple) + 1, multiple)
    for n in sizes:
        hidden = torch.zeros(n, weight.shape[1], dtype=weight.dtype, device=weight.device, requires_grad=True)
        linear_cross_entropy(hidden, weight.detach(), torch.zeros(n, dtype=torch.long, device=weight.device),
                             row_multiple=row_multiple)
    return len(sizes)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int | None = None, row_multiple: int = 0) -> torch.Tensor:
    """Sum over rows of the cross-entropy of ``hidden @ weight.T`` against ``target`` (fp32 result).

    Computes what ``F.cross_entropy(lm_head(hidden).float(), target, reduction="sum")`` computes, under
    autocast too (inputs are cast to the autocast dtype like ``lm_head`` would), without keeping the
    logits: peak extra memory is one chunk of rows.

    ``row_multiple`` (``gemm_row_multiple``): chunks are a multiple of it and the last one is padded with zero rows
    to one, so the matmuls meet few shapes however many label rows a step has (a shape cuBLAS has not met holds
    the host until the GPU is idle). The padding rows add nothing to the loss or the gradients.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    chunk, row_multiple = loss_chunk_rows(weight.shape[0], weight.element_size(), row_multiple, chunk)
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum() * 0.0).float() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, target, int(chunk), int(row_multiple))
