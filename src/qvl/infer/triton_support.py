"""Where qvl's Triton kernels (qvl.infer.moe_kernels, qvl.infer.attend_kernels) run: CUDA with Triton installed, or
a CPU under Triton's interpreter (``TRITON_INTERPRET=1``, the tests), on which device they launch, and whether their
launches overlap."""

from __future__ import annotations

import contextlib
import functools
import os

import torch


@functools.cache
def installed() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether Triton kernels run on ``device``: CUDA with Triton (or Triton's interpreter on a CPU)."""
    return installed() and (torch.device(device).type == "cuda" or interpreting())


# Programmatic dependent launch (PDL) of the decode step's kernels (qvl.infer._launch_triton): each lets the next
# start at once, and the next reads nothing of it before it has ended, so that a step's ~9 kernels a layer would stop
# paying a launch and a ramp-up each. Off by default: no gain measured. 30B-A3B's captured 1-row step at 1,100 keys
# 3.76 ms overlapped against 3.74 serial, 32 rows 24.34 against 24.35; equal logits (H100, 2026-12-06,
# bench/results/decode_moe_launches_sum_after_h100.json; 3.77 against 3.86 with the slower down_sum kernel,
# decode_moe_launches_h100.json). bench/decode.py times both ways (``launch_overlap_ms``) and keeps the faster for its
# own process; a capture that fails with it turns it off (qvl.infer.decode.DecodeModel._capture).
LAUNCH_OVERLAP = False


@functools.cache
def _overlaps(index: int) -> bool:
    from qvl.infer import _launch_triton

    return (_launch_triton.gdc_wait is not None
            and torch.cuda.get_device_capability(index) >= (9, 0))  # griddepcontrol: Hopper and later


def overlap(device: torch.device) -> dict:
    """Launch options of a kernel that calls qvl.infer._launch_triton's pair: ``PDL`` its constexpr, and Triton's
    ``launch_pdl`` where the launches overlap (:data:`LAUNCH_OVERLAP`, on a CUDA card of compute capability 9 or
    later with a Triton that has the instructions; never under the interpreter)."""
    device = torch.device(device)
    if LAUNCH_OVERLAP and device.type == "cuda" and not interpreting() and installed() \
            and _overlaps(device.index if device.index is not None else torch.cuda.current_device()):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


def on_device(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream): the tensors' own."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
