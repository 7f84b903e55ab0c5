"""Where qvl's Triton kernels (qvl.infer.moe_kernels, qvl.infer.attend_kernels) run: CUDA with Triton installed, or
a CPU under Triton's interpreter (``TRITON_INTERPRET=1``, the tests), and on which device they launch."""

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


def on_device(device: torch.device):
    """Triton launches on the current CUDA device (and its current stream): the tensors' own."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
