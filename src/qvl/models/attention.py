"""The vision tower's attention: one flash-attention varlen call per block, or sdpa without the cuDNN backend.

transformers' Qwen3-VL vision attention (sdpa) calls ``scaled_dot_product_attention`` once per image or
video frame group, with a new sequence length almost every call. On an H100, sdpa picks cuDNN attention,
which builds an execution plan on the host for each new shape: 1.35 ms of CPU per call against ~0.1 ms
of GPU work (profile of 2 LoRA-8B training steps, 351 vision calls: 460 ms of host time,
``docs/benchmarks.md``). Training and prefill are host-bound there, so the vision tower runs sdpa with
flash / memory-efficient / math kernels only; the values are the same attention, computed by another
kernel (no mask, non-causal).

Where torch has the flash-attention varlen kernel (torch >= 2.10), the tower's attention goes further:
``qvl_flash_varlen_vision`` (the name says "flash", so transformers hands it the segment bounds ``cu_seqlens``
and their longest length, read once per tower forward) runs every image and frame of a block in one varlen call
instead of one sdpa call per image, with no host read per block; where the kernel cannot run (CPU, fp32) it
runs the same per-segment sdpa as above.
"""

from __future__ import annotations

import torch

VISION_SDPA = "qvl_vision_sdpa"
VISION_VARLEN = "qvl_flash_varlen_vision"


def without_cudnn():
    """A context in which sdpa picks among flash, memory-efficient and math kernels, not cuDNN's: for calls whose
    shapes change from call to call (cuDNN plans each new shape on the host, the module's docstring says what it
    cost)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def vision_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention with cuDNN left out of the backends sdpa may pick."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with without_cudnn():
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def vision_varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout: float = 0.0,
                            cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Full attention inside each image / frame segment of the tower's row: (1, H, L, D) -> (1, L, H, D).

    One flash-attention varlen call where it runs; elsewhere sdpa per segment (the bounds read on the host)."""
    from qvl.data.packing import varlen_causal, varlen_usable

    if varlen_usable(query, dropout):
        # an int from transformers (a SymInt when the block is compiled: int() would fix it to one value, and every
        # new value would recompile); a tensor from older callers
        longest = max_length_q if isinstance(max_length_q, (int, torch.SymInt)) else int(max_length_q)
        return varlen_causal(query, key, value, cu_seq_lens_q, longest, scaling, causal=False), None
    if dropout or (torch.is_grad_enabled() and query.requires_grad):  # a training tower: autograd through sdpa
        return _segment_sdpa(query, key, value, cu_seq_lens_q, scaling, dropout), None
    # a frozen tower: the host read of the bounds inside one op, so a compiled tower stays one graph here too
    return segment_attention(query, key, value, cu_seq_lens_q, scaling), None


def _segment_sdpa(query, key, value, cu, scaling, dropout=0.0):
    starts = cu.tolist()
    outs = [vision_sdpa_attention(None, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, scaling=scaling,
                                  dropout=dropout, is_causal=False)[0] for s, e in zip(starts[:-1], starts[1:])]
    return torch.cat(outs, dim=1)


@torch.library.custom_op("qvl::segment_attention", mutates_args=())
def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                      scaling: float | None) -> torch.Tensor:
    """:func:`vision_varlen_attention` where the varlen kernel cannot run, without autograd: sdpa per segment,
    (1, H, L, D) in, (1, L, H, D) out. One op to the compiler: the segment bounds it reads on the host would
    otherwise split a compiled tower into a graph per block."""
    return _segment_sdpa(query, key, value, cu_seqlens, scaling)


@segment_attention.register_fake
def _segment_attention_fake(query, key, value, cu_seqlens, scaling):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[3])


def use_vision_sdpa(model, varlen: bool | None = None) -> bool:
    """Point the vision tower's sdpa attention at :func:`vision_varlen_attention` (``varlen``; default: where
    torch has the kernel) or :func:`vision_sdpa_attention` (through PEFT / DDP wrappers); False if it has none or
    uses another attention (eager, flash-attn)."""
    from transformers import AttentionInterface

    from qvl.data.packing import varlen_available

    configs = {id(m.config): m.config for m in model.modules()
               if type(m).__name__.endswith("VisionAttention") and hasattr(m, "config")}
    configs = [c for c in configs.values() if c._attn_implementation in ("sdpa", VISION_SDPA, VISION_VARLEN)]
    if not configs:
        return False
    AttentionInterface.register(VISION_SDPA, vision_sdpa_attention)
    AttentionInterface.register(VISION_VARLEN, vision_varlen_attention)
    impl = VISION_VARLEN if (varlen_available() if varlen is None else varlen) else VISION_SDPA
    for config in configs:
        config._attn_implementation = impl
    return True
