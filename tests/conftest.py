"""Shared fixtures: the tiny Qwen3-VL checkpoint is built once per test session (about 2 s)."""

from __future__ import annotations

import os

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
