"""Compiled code kept between runs: torch.compile's caches in ``~/.cache/qvl/torch-compile`` instead of ``/tmp``.

Inductor keeps what it compiled (generated kernels, FX graphs, AOT autograd graphs) under
``/tmp/torchinductor_<user>`` unless ``TORCHINDUCTOR_CACHE_DIR`` says otherwise; /tmp is emptied at reboot (and
on many clusters per job). The first ``qvl train`` on an 8B model spends minutes compiling; with the cache warm the
first step came 73 s sooner on an H200 (224 s cold, 151 s warm; 2026-12-04, bench/results/train_cli.json, the
``recipe`` row ran second). Set by the command-line entry points, before anything compiles; a value the user set
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
