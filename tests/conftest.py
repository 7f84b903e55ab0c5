"""Shared fixtures: the tiny Qwen3-VL checkpoint is built once per test session (about 2 s)."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from qvl.models.build import build_tiny

    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(out)
    return out


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, processor) loaded from the tiny checkpoint. Do not mutate: it is shared."""
    from qvl.models.load import load

    return load(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_processor(tiny):
    return tiny[1]


@pytest.fixture(autouse=True)
def close_engines_the_test_made():
    """Every transformers engine a test (or a function-scoped fixture of it) builds is closed after the test. An
    engine left open keeps its worker thread, and a thread that decoded a video once hung a later test's fork
    (PyAV's per-thread converter; tests/data/test_media.py): tests must not lean on one another's leftovers.
    (Patched by hand, not with ``monkeypatch``: requesting it here would create every test's ``monkeypatch`` first,
    so its undo would run after the other fixtures' teardown, e.g. after tests/train/conftest.py's restoring of
    torch's config, whose module then reads a monkeypatched-and-undone setting as deleted.)"""
    from qvl.infer.transformers_backend import TransformersEngine

    made = []
    init = TransformersEngine.__init__

    def recording_init(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    TransformersEngine.__init__ = recording_init
    try:
        yield
    finally:
        TransformersEngine.__init__ = init
        for engine in made:
            if hasattr(engine, "_worker"):  # built far enough to have a worker
                engine.close()
