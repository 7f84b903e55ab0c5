"""Fixtures for the tests against a real (CPU) vLLM: `make test-vllm` runs them in .venv-vllm.

Every vLLM engine start costs ~40 s on two cores, so each module starts its servers once (module-scoped
fixtures) and runs many checks against them. Under plain `make test` (no vllm installed) no module
here is collected. (The folder is not called ``vllm``: under pytest ``tests/`` is on
sys.path, and a folder of that name would be imported as the package.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from servers import QvlServer  # noqa: E402

# without vLLM (plain `make test`) these modules are not collected at all: `make test-vllm` runs them, so they
# are neither run nor reported as skipped here
if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory):
    """The tiny model's demo variant, in a folder named ``tiny`` (the id the API tests ask for). vLLM's CPU
    attention has kernels for head dims 32 and up; the default tiny model's is 16, the demo variant's 32."""
    from qvl.models.build import build_tiny

    out = tmp_path_factory.mktemp("vllm-models") / "tiny"
    build_tiny(out, variant="demo")
    return out


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """start_server(args, env=None) -> QvlServer; every server started is stopped at the end of the session
    (module fixtures stop theirs earlier)."""
    servers = []
    logs = tmp_path_factory.mktemp("server-logs")

    def start(args, env=None, name="qvl-serve"):
        s = QvlServer(args, logs / f"{name}-{len(servers)}.log", env)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()
