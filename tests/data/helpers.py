"""Small media writers shared by data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_image(path: Path, w: int = 96, h: int = 64, colour=(200, 30, 30)) -> Path:
    from PIL import Image

    arr = np.zeros((h, w, 3), np.uint8)
    arr[:] = colour
    Image.fromarray(arr).save(path)
    return path


def write_video(path: Path, frames: int = 16, fps: int = 8, w: int = 96, h: int = 64) -> Path:
    """An mp4 whose frame i has brightness 15*i (so decoded frames identify their index)."""
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(np.full((h, w, 3), min(255, 15 * i), np.uint8), format="rgb24")
            for pk in s.encode(f):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


BITS = 10


def write_indexed_video(path: Path, frames: int, fps: int, w: int = 160, h: int = 48) -> Path:
    """Each frame shows its own index in binary: BITS vertical stripes, white = 1."""
    import av

    stripe = w // BITS
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.codec_context.bit_rate = 4_000_000
        for i in range(frames):
            arr = np.zeros((h, w, 3), np.uint8)
            for b in range(BITS):
                if (i >> b) & 1:
                    arr[:, b * stripe:(b + 1) * stripe] = 255
            for pk in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                c.mux(pk)
        for pk in s.encode():
            c.mux(pk)
    return path


def read_index(frame: np.ndarray) -> int:
    stripe = frame.shape[1] // BITS
    return sum(1 << b for b in range(BITS) if frame[:, b * stripe + 2:(b + 1) * stripe - 2].mean() > 127)
