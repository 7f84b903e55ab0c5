"""Writing outputs without ever leaving a half-written file or overwriting a user's data."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from qvl.errors import QvlError


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; rename it to ``out`` only if the block succeeds.

    An existing non-empty ``out`` is an error unless ``overwrite`` is set (then it is replaced
    only after the new folder is complete).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise QvlError(f"{out} exists and is not empty", fix="choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename a completed folder to ``final``; an existing ``final`` is set aside first, removed after."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def atomic_write_text(path: Path, text: str, overwrite: bool = True) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise QvlError(f"{path} exists", fix="choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_jsonl(path: Path, rows: Iterable[dict], overwrite: bool = True) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), overwrite)


def atomic_write_json(path: Path, obj, overwrite: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n", overwrite)


def refuse_same_file(output: Path, *inputs: Path) -> None:
    """Outputs never overwrite an input file."""
    out = Path(output).resolve()
    for i in inputs:
        if Path(i).resolve() == out:
            raise QvlError(f"output {output} is the input file", fix="write to another path; inputs are never overwritten")


GIB = 2**30


def free_bytes(folder: Path) -> int | None:
    """Bytes free for writing on the disk that holds ``folder`` (its nearest existing parent); None if unknown."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def is_disk_full(e: BaseException) -> bool:
    """``e`` says its write failed for want of disk space (or quota). safetensors' Rust writer raises its own error
    type with the OS error in its text ("No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in ("No space left on device", "os error 28", "Disk quota exceeded"))


# room kept beyond a write's own size: the small files written around it (states, markers) must fit too
DISK_MARGIN = 64 * 2**20


@contextlib.contextmanager
def disk_space_for(folder: Path, what: str, needed: int, fix: str) -> Iterator[None]:
    """Write ``what`` (about ``needed`` bytes) into ``folder`` inside this block. Refused up front when the disk has
    less free (with :data:`DISK_MARGIN`); a write that still runs out of space is said the same way, not as the
    writer's own error (torch.save's is "PytorchStreamWriter failed writing file data/0: file write failed",
    which names no cause: it counts as out of space when the disk is all but full now, the partial files still
    there). The caller removes its partial files."""
    free = free_bytes(folder)
    have = f"{free / GIB:.1f} GiB free" if free is not None else "free space unknown"
    full = QvlError(f"not enough disk space for {what} in {folder}: it needs about {needed / GIB:.1f} GiB, {have}",
                    fix=fix)
    if free is not None and needed + DISK_MARGIN > free:
        raise full
    try:
        yield
    except QvlError:
        raise
    except Exception as e:
        now = free_bytes(folder)
        if is_disk_full(e) or (now is not None and now < max(DISK_MARGIN, needed // 100)):
            raise full from e
        raise


def cache_dir() -> Path:
    """qvl's cache folder ($QVL_CACHE_DIR, else ~/.cache/qvl)."""
    root = Path(os.environ.get("QVL_CACHE_DIR") or Path.home() / ".cache" / "qvl")
    root.mkdir(parents=True, exist_ok=True)
    return root
