"""A fixed, seeded, realistic fine-tuning workload for benchmarks (no downloads, no video codec).

Mix: text-only chats, one image of ~200-1,300 visual tokens, two images, and short videos (frame
lists, so no codec is needed on the GPU machine); answers from a few to several hundred tokens
(log-normal). Media are written to a folder and go through ``qvl.data.preprocess.encode``, the
same path training uses.
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
