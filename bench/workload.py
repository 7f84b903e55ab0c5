"""Fixed, seeded, realistic fine-tuning workloads for benchmarks (no downloads, no video codec).

:func:`make_workload` — the mix: text-only chats, one image of ~200-1,300 visual tokens, two images, and short
videos (frame lists, so no codec is needed on the GPU machine); answers from a few to several hundred tokens
(log-normal). :func:`make_video_workload` — video-heavy: every sample a clip of 8-16 frames sized so the sample is
4k-16k tokens (``VIDEO_BUDGET``: the video YAML's budget, under which the frames keep their size). Media are written
to a folder and go through ``qvl.data.preprocess.encode``, the same path training uses.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np

WORDS = ("the a shape red green blue circle square left right top bottom count image frame moves "
         "describe object colour answer question there is are one two three of in on and").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _image(path: Path, rng: random.Random, tokens: int, aspect: float) -> str:
    from PIL import Image

    pixels = tokens * 32 * 32
    w = max(64, int(math.sqrt(pixels * aspect)))
    h = max(64, int(pixels / w))
    arr = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=85)
    return path.name


def _frame(path: Path, rng: random.Random, width: int, height: int) -> str:
    """A smooth random frame (a small noise image scaled up): compresses and decodes fast at 1-2 MP."""
    from PIL import Image

    small = np.random.default_rng(rng.randrange(2**32)).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(path, quality=85)
    return path.name


# examples/lora_8b_video.yaml's video settings: 2 fps sampling of clips shot at 2 fps keeps every frame (up to 16),
# and 16k tokens' worth of pixels per clip (frames x H x W / 2,048 = tokens: 32 x 32 pixels a token, frames in pairs)
VIDEO_BUDGET = dict(video_fps=2.0, video_min_frames=4, video_max_frames=16, video_max_pixels=16384 * 2048)


def make_video_workload(folder: Path, n: int = 64, seed: int = 0, tokens=(3_500, 15_500)) -> list[dict]:
    """Raw video samples in the official format, frames under ``folder``: 8, 12 or 16 frames (shot at 2 fps), each
    clip ``tokens`` visual tokens (uniform in the range; 4:3 frames whose sides are multiples of 32 pixels), a question
    and an answer of a few to a few hundred words (as :func:`make_workload`)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        frames = rng.choice([8, 12, 16])
        cells = rng.uniform(*tokens) * 2 / frames  # 32 x 32 cells of a frame: a token is one cell of a frame pair
        h = max(2, int(math.sqrt(cells * 3 / 4)))
        w = max(2, int(cells / h))
        names = [_frame(folder / f"v{i}_{k}.jpg", rng, w * 32, h * 32) for k in range(frames)]
        answer_words = int(min(600, max(2, rng.lognormvariate(3.6, 1.0))))
        rows.append({"video": [names], "sample_fps": 2,
                     "conversations": [{"from": "human", "value": "<video>\n" + _text(rng, rng.randint(6, 60)) + "?"},
                                       {"from": "gpt", "value": _text(rng, answer_words)}]})
    (folder / "workload.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def make_workload(folder: Path, n: int = 512, seed: int = 0) -> list[dict]:
    """Raw samples in the official format, media written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = rng.choices(["text", "image", "multi", "video"], weights=[0.2, 0.55, 0.15, 0.1])[0]
        answer_words = int(min(600, max(2, rng.lognormvariate(3.6, 1.0))))  # median ~37, tail to hundreds
        question = _text(rng, rng.randint(6, 60)) + "?"
        row: dict = {}
        if kind == "image":
            row["image"] = _image(folder / f"i{i}.jpg", rng, rng.randint(200, 1300), rng.uniform(0.5, 2.0))
            question = "<image>\n" + question
        elif kind == "multi":
            row["image"] = [_image(folder / f"i{i}_{k}.jpg", rng, rng.randint(150, 500), rng.uniform(0.7, 1.5))
                            for k in range(2)]
            question = "<image><image>\n" + question
        elif kind == "video":
            frames = []
            for k in range(rng.choice([8, 12, 16])):
                frames.append(_image(folder / f"v{i}_{k}.jpg", rng, 160, 1.33))
            row["video"] = [frames]
            row["sample_fps"] = 4
            question = "<video>\n" + question
        row["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": _text(rng, answer_words)}]
        rows.append(row)
    (folder / "workload.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def histogram(lengths: list[int], edges=(0, 128, 256, 512, 1024, 1536, 2048, 4096, 10**9)) -> list[tuple[str, int]]:
    out = []
    for lo, hi in zip(edges, edges[1:]):
        label = f"{lo}-{hi - 1}" if hi < 10**9 else f">={lo}"
        out.append((label, sum(lo <= x < hi for x in lengths)))
    return out
