"""Fixtures for training tests: a tiny colour dataset (the model must look at the image) and a config factory."""

from __future__ import annotations

import json

import numpy as np
import pytest
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


@pytest.fixture(scope="session")
def colour_data(tmp_path_factory):
    return make_colour_data(tmp_path_factory.mktemp("colours"), 32)


@pytest.fixture
def make_cfg(tiny_model_dir, colour_data, tmp_path):
    from qvl.train.config import build_config

    def make(**kw):
        values = dict(model_name_or_path=str(tiny_model_dir), dataset_use=colour_data, output_dir=str(tmp_path / "run"),
                      tune_mm_llm=True, tune_mm_mlp=True, learning_rate=1e-3, per_device_train_batch_size=4,
                      max_steps=4, save_steps=1000, report_to="none", seed=0, lr_scheduler_type="constant",
                      max_pixels=64 * 64, min_pixels=64 * 64)
        values.update(kw)
        return build_config(values)

    return make
