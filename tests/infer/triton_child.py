"""Tests of Triton kernels on a CPU: Triton's interpreter runs them, and it must be on before Triton is first
imported (its own library functions are built then), so such a test file runs itself again in a child pytest with
``TRITON_INTERPRET=1`` (:func:`run_under_the_interpreter`); its kernel tests take the :func:`interpreted` fixture and
skip in the parent.

A child runs on one core for minutes (the interpreter is single-threaded Python), so the suite starts the children
of the files it collected as soon as collection ends, one after another in a background thread, and runs the tests
that wait on them last (tests/conftest.py, the ``child_pytest`` marker): the rest of the suite runs on the other
core meanwhile. Run alone, such a test runs its child itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading

import pytest

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
TIMEOUT_S = 1800  # one child, from its start (it shares the machine with the rest of the suite)


@pytest.fixture
def interpreted():
    if not INTERPRETING:
        pytest.skip("runs in the child pytest under Triton's interpreter")


def _command(test_file: str) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file]


def _run(test_file: str, started: list | None = None) -> subprocess.CompletedProcess:
    """The child pytest of ``test_file``, run to its end; ``started`` gets its process (to kill it early)."""
    proc = subprocess.Popen(_command(test_file), env={**os.environ, "TRITON_INTERPRET": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if started is not None:
        started.append(proc)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += f"\nthe child pytest ran past {TIMEOUT_S} s"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


class _Background:
    """The children of several test files, run one after another in a daemon thread; results by file."""

    def __init__(self, test_files: list[str]):
        self.results: dict[str, subprocess.CompletedProcess] = {}
        self.done = {f: threading.Event() for f in test_files}
        self.started: list[subprocess.Popen] = []
        self.stopped = False
        threading.Thread(target=self._run_all, name="triton-children", daemon=True).start()

    def _run_all(self):
        for f, done in self.done.items():
            try:
                if not self.stopped:
                    self.results[f] = _run(f, self.started)
            except Exception as e:  # said by the test that waits for it, which never hangs
                self.results[f] = subprocess.CompletedProcess(_command(f), -1, "", f"{type(e).__name__}: {e}")
            finally:
                done.set()


_background: _Background | None = None


def start_in_background(test_files: list[str]) -> None:
    """Start the children of ``test_files`` (absolute paths) now, one after another, beside the rest of the run."""
    global _background
    if test_files and _background is None and not INTERPRETING:
        _background = _Background([os.path.abspath(f) for f in test_files])


def stop_background() -> None:
    """The run is ending: start no more children and end any still running."""
    if _background is not None:
        _background.stopped = True
        for proc in _background.started:
            if proc.poll() is None:
                proc.kill()


def run_under_the_interpreter(test_file: str, least_passed: int) -> None:
    """Run ``test_file`` in a child pytest under the interpreter (or wait for the one started in the background): it
    passes, with at least ``least_passed`` tests (the kernel tests ran, not skipped)."""
    test_file = os.path.abspath(test_file)
    if _background is not None and test_file in _background.done:
        _background.done[test_file].wait()
        r = _background.results.get(test_file)
        if r is None:
            pytest.skip("the run stopped before this file's child started")
    else:
        r = _run(test_file)
    passed = re.search(r"(\d+) passed", r.stdout)
    assert r.returncode == 0 and passed and int(passed.group(1)) >= least_passed, r.stdout[-4000:] + r.stderr[-2000:]
