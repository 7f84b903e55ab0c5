"""bench/provenance.py names the code a benchmark ran by the tree of its files, not by the checkout's HEAD."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from provenance import commits_with, source_tree  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_tree_of_the_files_names_the_commit_whatever_head_says(tmp_path):
    repo = tmp_path / "repo"
    (repo / "src" / "qvl").mkdir(parents=True)
    (repo / "src" / "qvl" / "a.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "one")
    first = _git(repo, "rev-parse", "--short", "HEAD")
    assert source_tree(repo) == _git(repo, "rev-parse", "HEAD:src/qvl")
    assert commits_with(source_tree(repo), repo) == [first]

    (repo / "src" / "qvl" / "a.py").write_text("x = 2\n")  # a tree two commits ahead of a stale .git: ...
    (repo / "src" / "qvl" / "__pycache__").mkdir()
    (repo / "src" / "qvl" / "__pycache__" / "a.pyc").write_bytes(b"\0")  # (ignored files do not count)
    ran = source_tree(repo)
    assert ran != _git(repo, "rev-parse", "HEAD:src/qvl") and commits_with(ran, repo) == []
    assert _git(repo, "status", "--porcelain") == "M src/qvl/a.py"  # the checkout's own index untouched
    _git(repo, "commit", "-qam", "two")  # ... the commit made later is the one it names
    assert commits_with(ran, repo) == [_git(repo, "rev-parse", "--short", "HEAD")]


def test_no_repository_gives_none(tmp_path):
    (tmp_path / "src" / "qvl").mkdir(parents=True)
    assert source_tree(tmp_path) is None
