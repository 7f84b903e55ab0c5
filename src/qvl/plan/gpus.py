"""GPUs the planner knows, by the memory that torch reports as the card's total, and memory-size parsing."""

from __future__ import annotations

import re
from dataclasses import dataclass

from qvl.errors import QvlError

GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    name: str
    total_gib: float  # torch.cuda.get_device_properties(i).total_memory / 2**30
    label: str
    bf16: bool = True


# total_gib: what CUDA reports as the card's total (nvidia-smi MiB / 1024), slightly below the marketing size.
GPUS: dict[str, Gpu] = {g.name: g for g in (
    Gpu("h100", 79.2, "NVIDIA H100 80GB (SXM or PCIe)"),
    Gpu("h100-nvl", 93.1, "NVIDIA H100 NVL 94GB"),
    Gpu("h200", 139.8, "NVIDIA H200 141GB"),
    Gpu("b200", 178.4, "NVIDIA B200 180GB"),
    Gpu("a100-80g", 79.2, "NVIDIA A100 80GB"),
    Gpu("a100-40g", 39.4, "NVIDIA A100 40GB"),
    Gpu("l40s", 44.4, "NVIDIA L40S 48GB"),
    Gpu("l40", 44.4, "NVIDIA L40 48GB"),
    Gpu("a40", 44.4, "NVIDIA A40 48GB"),
    Gpu("a6000", 47.5, "NVIDIA RTX A6000 48GB"),
    Gpu("rtx6000-ada", 47.5, "NVIDIA RTX 6000 Ada 48GB"),
    Gpu("rtx-pro-6000", 94.97, "NVIDIA RTX PRO 6000 Blackwell 96GB"),
    Gpu("rtx5090", 31.4, "NVIDIA GeForce RTX 5090 32GB"),
    Gpu("rtx4090", 23.6, "NVIDIA GeForce RTX 4090 24GB"),
    Gpu("rtx3090", 23.6, "NVIDIA GeForce RTX 3090 24GB"),
    Gpu("a10g", 22.0, "NVIDIA A10G 24GB (AWS g5)"),
    Gpu("a10", 22.0, "NVIDIA A10 24GB"),
    Gpu("l4", 22.0, "NVIDIA L4 24GB"),
    Gpu("rtx4080", 15.6, "NVIDIA GeForce RTX 4080 16GB"),
    Gpu("t4", 14.6, "NVIDIA T4 16GB (no bf16: fp16 only)", bf16=False),
    Gpu("v100-32g", 31.7, "NVIDIA V100 32GB (no bf16: fp16 only)", bf16=False),
)}

_ALIASES = {
    "h100-80g": "h100", "h100-sxm": "h100", "h100-pcie": "h100", "h100-80gb": "h100",
    "h200-141g": "h200", "a100": "a100-80g", "a100-80gb": "a100-80g", "a100-40gb": "a100-40g",
    "4090": "rtx4090", "3090": "rtx3090", "5090": "rtx5090", "rtx-4090": "rtx4090", "rtx-3090": "rtx3090",
    "rtx-5090": "rtx5090", "a6000-48g": "a6000", "l40s-48g": "l40s",
}


def resolve_gpu(name: str) -> Gpu:
    key = name.strip().lower().replace("_", "-").replace(" ", "-")
    key = _ALIASES.get(key, key)
    if key in GPUS:
        return GPUS[key]
    raise QvlError(f"unknown GPU {name!r}", fix=f"use one of {', '.join(GPUS)}, or give the memory with "
                   "--gpu-mem (e.g. --gpu-mem 32GiB)")


_MEM = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_UNITS = {"": GIB, "g": GIB, "gi": GIB, "gib": GIB, "gb": 1e9, "m": 2**20, "mi": 2**20, "mib": 2**20,
          "mb": 1e6, "t": 2**40, "tib": 2**40, "tb": 1e12}


def parse_mem(text: str | float | int) -> float:
    """'32GiB', '32G', '32' (GiB), '24GB' (10^9 bytes), '24564MiB' → GiB."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        m = _MEM.match(text)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise QvlError(f"cannot read the memory size {text!r}", fix="write it like 32GiB, 24GB or 81559MiB")
        value = float(m.group(1)) * _UNITS[unit] / GIB
    if value <= 0:
        raise QvlError(f"memory size must be positive, got {text!r}")
    return value


def gpu_from_args(gpu: str | None, gpu_mem: str | float | None) -> Gpu:
    """--gpu NAME or --gpu-mem SIZE (the latter wins; both may be given to relabel a card)."""
    if gpu_mem is not None:
        gib = parse_mem(gpu_mem)
        base = resolve_gpu(gpu) if gpu else None
        return Gpu(base.name if base else "custom", gib, f"{base.label if base else 'GPU'} ({gib:.1f} GiB)",
                   bf16=base.bf16 if base else True)
    if gpu:
        return resolve_gpu(gpu)
    raise QvlError("no GPU given", fix=f"pass --gpu ({', '.join(list(GPUS)[:8])}, …) or --gpu-mem 24GiB")


def held_by_others_gib(index: int = 0) -> float:
    """GiB of CUDA device ``index`` that other processes hold (a server, a notebook): its used memory less this
    process's (what torch's allocator reserves, and a CUDA context); 0 below 1 GiB (the driver's, a display's).
    Asking creates this process's CUDA context if it has none."""
    import torch

    from qvl.plan.memory import CUDA_CONTEXT_GIB

    free, total = torch.cuda.mem_get_info(index)
    held = (total - free - torch.cuda.memory_reserved(index)) / GIB - CUDA_CONTEXT_GIB
    return held if held >= 1.0 else 0.0


def detect_gpu(index: int = 0) -> Gpu | None:
    """The local CUDA device, or None when there is none (imports torch). Its ``total_gib`` leaves out what other
    processes hold (:func:`held_by_others_gib`): a plan for the whole card would say "fits" and run out of memory
    later (an 8B LoRA run beside a process holding 17.4 GiB of an H100 did, 2026-12-05)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(index)
        others = held_by_others_gib(index)
    except Exception:  # noqa: BLE001 - no usable CUDA means "unknown", not an error
        return None
    major = getattr(props, "major", 8)
    total = props.total_memory / GIB
    label = props.name + (f" ({others:.1f} of its {total:.1f} GiB held by other processes)" if others else "")
    return Gpu("detected", total - others, label, bf16=major >= 8)
