"""Which code a benchmark ran: git's tree hash of ``src/qvl`` as the files are, not as the checkout's HEAD says.

A GPU run takes the working tree as it is, and its copy of ``.git`` may be older than that tree (a result's
``git describe`` has read a commit two behind, "-dirty"). The tree hash of the files themselves equals
``git rev-parse COMMIT:src/qvl`` for the commit whose code ran, so it names that commit whatever ``.git`` holds:

    python bench/provenance.py TREE      # the commits whose src/qvl is TREE (newest first)
    python bench/provenance.py           # this checkout's tree, and the commits that have it
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/qvl"


def _git(args: list[str], root: Path, env=None) -> str:
    return subprocess.run(["git", *args], cwd=root, env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout.strip()


def source_tree(root: Path = ROOT) -> str | None:
    """The tree hash of ``root``'s src/qvl as its files are now (ignored files left out, as a commit would), or None
    where git is missing or ``root`` is no repository. A throwaway index: the checkout's own is not touched."""
    with tempfile.TemporaryDirectory() as d:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(d, "index"))
        try:
            _git(["add", "-A", "--", SOURCE], root, env)
            return _git(["write-tree", f"--prefix={SOURCE}/"], root, env)
        except (OSError, subprocess.SubprocessError):
            return None


def commits_with(tree: str, root: Path = ROOT, limit: int = 500) -> list[str]:
    """The commits (short hashes, newest first, of the last ``limit``) whose src/qvl is ``tree``."""
    out = []
    for commit in _git(["log", f"-{limit}", "--format=%h"], root).split():
        try:
            if _git(["rev-parse", f"{commit}:{SOURCE}"], root) == tree:
                out.append(commit)
        except subprocess.CalledProcessError:  # a commit before src/qvl existed
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    tree = argv[0] if argv else source_tree()
    if tree is None:
        print("no git here: the tree cannot be read", file=sys.stderr)
        return 1
    found = commits_with(tree)
    print(f"{SOURCE} tree {tree}: " + (", ".join(found) if found else "no commit of the last 500 has it "
                                        "(uncommitted changes ran)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
