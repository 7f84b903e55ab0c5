"""Tests of Triton kernels on a CPU: Triton's interpreter runs them, and it must be on before Triton is first
imported (its own library functions are built then), so such a test file runs itself again in a child pytest with
``TRITON_INTERPRET=1`` (:func:`run_under_the_interpreter`); its kernel tests take the :func:`interpreted` fixture and
skip in the parent."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture
def interpreted():
    if not INTERPRETING:
        pytest.skip("runs in the child pytest under Triton's interpreter")


def run_under_the_interpreter(test_file: str, least_passed: int) -> None:
    """Run ``test_file`` in a child pytest under the interpreter: it passes, with at least ``least_passed`` tests
    (the kernel tests ran, not skipped)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=900)
    passed = re.search(r"(\d+) passed", r.stdout)
    assert r.returncode == 0 and passed and int(passed.group(1)) >= least_passed, r.stdout[-4000:] + r.stderr[-2000:]
