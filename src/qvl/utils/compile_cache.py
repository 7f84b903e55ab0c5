"""Compiled code kept between runs: torch.compile's caches in ``~/.cache/qvl/torch-compile`` instead of ``/tmp``.

Inductor keeps what it compiled (generated kernels, FX graphs, AOT autograd graphs) under
``/tmp/torchinductor_<user>`` unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise; /tmp is emptied at reboot (and
on many clusters per job). The first ``qvl train`` of an 8B model spends most of its first minute compiling; with
the cache warm its first step came at 43 s instead of 59 s on an H200 (2026-12-05,
bench/results/train_cli_first_step.json). Set by the command-line entry points, before anything compiles; a value the user set
is kept.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "TORCHINDUCTOR_CACHE_DIR"


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qvl" / "torch-compile"


def keep_compiled_code() -> str | None:
    """Point torch.compile's cache at :func:`default_dir` unless ``TORCHINDUCTOR_CACHE_DIR`` is set; returns the
    folder in use (None where it cannot be made: torch's own default then)."""
    if os.environ.get(ENV):
        return os.environ[ENV]
    folder = default_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    os.environ[ENV] = str(folder)
    return str(folder)
