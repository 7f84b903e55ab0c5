"""Fixtures: servers on 127.0.0.1 (free port, in a thread) around the tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import Running  # noqa: E402


@pytest.fixture(scope="session")
def tiny_engine(tiny):
    from qvl.infer.transformers_backend import TransformersEngine

    model, processor = tiny
    with TransformersEngine(model, processor, name="tiny") as engine:
        yield engine


@pytest.fixture
def serve():
    """serve(engine, **ServeSettings fields) -> Running; stopped after the test."""
    from qvl.serve.app import ServeSettings, create_app

    started = []

    def start(engine, **settings):
        r = Running(create_app(engine, ServeSettings(**settings)))
        started.append(r)
        return r

    yield start
    for r in started:
        r.stop()


@pytest.fixture(scope="session")
def tiny_server(tiny_engine):
    from qvl.serve.app import ServeSettings, create_app

    r = Running(create_app(tiny_engine, ServeSettings(limit_mm_per_prompt={"image": 2, "video": 1})))
    yield r
    r.stop()
