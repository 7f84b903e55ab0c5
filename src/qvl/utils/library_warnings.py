"""Library messages a user cannot act on, dropped in one place so they do not interleave with qvl's output.

Where qvl's own call causes a library warning, the call is fixed instead (e.g. ``infer/decode.py`` reads the
model output's ``cache`` before the deprecated ``past_key_values``). Each entry below is a library talking about
itself, with the reason it is noise; every other warning, ours and the libraries', still reaches the screen.
"""

from __future__ import annotations

import logging
import re
import warnings

# (category, start of the message, who emits it and why the user cannot act on it)
PYTHON_WARNINGS: list[tuple[type[Warning], str, str]] = [
    (FutureWarning, "`is_gradient_checkpointing` is deprecated",
     "peft reads the old property name when it wraps a model for LoRA; transformers >= 5.24 renamed it"),
]

# logger name -> (start of the message, why it is noise)
LOG_MESSAGES: dict[str, tuple[str, str]] = {
    "DeepSpeed": ("Setting accelerator to CPU",
                  "accelerate imports DeepSpeed (when installed) on every save; on a machine without a GPU "
                  "DeepSpeed announces its CPU fallback on stdout, though qvl picks the device itself"),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",
                                      "peft imports bitsandbytes (when installed) for every LoRA run; on a CPU with "
                                      "AVX-512 BF16 bitsandbytes looks for an optional kernel from the Hugging Face "
                                      "hub and falls back to its own"),
    "torch.utils.cpp_extension": ("No CUDA runtime is found",
                                  "torch.compile on a machine without a GPU looks for a CUDA toolkit it does not "
                                  "need for CPU kernels"),
}


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_library_noise() -> None:
    """Install the filters above (idempotent). Called at the CLI's entry points, before any library is imported:
    a logging filter set on a logger's name stays when the library configures that logger later."""
    for category, start, _why in PYTHON_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, (start, _why) in LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == start for f in logger.filters):
            logger.addFilter(_DropMessage(start))

