"""Data makers shared by the training tests (a module of its own: `conftest` is ambiguous across test dirs)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
QUESTION = "What color is the image? Answer with one word."


def make_colour_data(folder, n: int, seed: int = 0, side: int = 64, text_only: int = 0) -> str:
    """``n`` solid noisy images, each asked for its colour; plus ``text_only`` text samples. Returns the jsonl path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    names = list(COLOURS)
    for i in range(n):
        c = names[i % len(names)]
        arr = np.clip(np.array(COLOURS[c]) + rng.normal(0, 20, (side, side, 3)), 0, 255).astype("uint8")
        Image.fromarray(arr).save(folder / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                       {"from": "gpt", "value": c}]})
    for i in range(text_only):
        rows.append({"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
