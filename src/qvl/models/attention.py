"""The vision tower's attention: sdpa without the cuDNN backend.

transformers' Qwen3-VL vision attention (sdpa) calls ``scaled_dot_product_attention`` once per image or
video frame group, with a new sequence length almost every call. On an H100, sdpa picks cuDNN attention,
which builds an execution plan on the host for each new shape: 1.35 ms of CPU per call against ~0.1 ms
of GPU work (profile of 2 LoRA-8B training steps, 351 vision calls: 460 ms of host time,
``docs/benchmarks.md``). Training and prefill are host-bound there, so the vision tower runs sdpa with
flash / memory-efficient / math kernels only; the values are the same attention, computed by another
kernel (no mask, non-causal).
"""

from __future__ import annotations

VISION_SDPA = "qvl_vision_sdpa"


def vision_sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention with cuDNN left out of the backends sdpa may pick."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_vision_sdpa(model) -> bool:
    """Point the vision tower's sdpa attention at :func:`vision_sdpa_attention` (through PEFT / DDP wrappers);
    False if it has none or uses another attention (eager, flash-attn)."""
    from transformers import AttentionInterface

    configs = {id(m.config): m.config for m in model.modules()
               if type(m).__name__.endswith("VisionAttention") and hasattr(m, "config")}
    configs = [c for c in configs.values() if c._attn_implementation in ("sdpa", VISION_SDPA)]
    if not configs:
        return False
    AttentionInterface.register(VISION_SDPA, vision_sdpa_attention)
    for config in configs:
        config._attn_implementation = VISION_SDPA
    return True
