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
def close_engines_the_test_made(monkeypatch):
    """Every transformers engine a test (or a function-scoped fixture of it) builds is closed after the test. An
    engine left open keeps its worker thread, and a thread that decoded a video once hung a later test's fork
    (PyAV's per-thread converter; tests/data/test_media.py): tests must not lean on one another's leftovers."""
    from qvl.infer.transformers_backend import TransformersEngine

    made = []
    init = TransformersEngine.__init__

    def recording_init(self, *args, **kwargs):
        made.append(self)
        init(self, *args, **kwargs)

    monkeypatch.setattr(TransformersEngine, "__init__", recording_init)
    yield
    for engine in made:
        if hasattr(engine, "_worker"):  # built far enough to have a worker
            engine.close()


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(config, items):
    """Tests that wait on a child pytest (Triton's kernels under its interpreter, tests/infer/triton_child.py) go
    last, and their children start now, one after another in the background: each runs on one core for minutes, so
    the rest of the suite runs beside them rather than after them."""
    waiting = [item for item in items if item.get_closest_marker("child_pytest")]
    if not waiting or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in waiting] + waiting
    from triton_child import start_in_background

    start_in_background([str(item.path) for item in waiting])


def pytest_unconfigure(config):
    child = sys.modules.get("triton_child")
    if child is not None:
        child.stop_background()
