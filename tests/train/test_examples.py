"""Every example config builds and takes one step on the tiny model (CPU smoke run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl.train.config import load_config
from qvl.train.loop import train

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_examples_exist():
    names = {p.stem for p in EXAMPLES}
    assert {"tiny_cpu", "lora_8b_24gb", "full_4b", "full_8b_zero3_offload", "lora_30b_a3b"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_takes_one_step(path, tiny_model_dir, colour_data, tmp_path):
    overrides = {"model_name_or_path": str(tiny_model_dir), "dataset_use": colour_data, "dataset_registry": None,
                 "output_dir": str(tmp_path / "run"), "max_steps": 1, "per_device_train_batch_size": 1,
                 "gradient_accumulation_steps": 1, "max_pixels": 4096, "min_pixels": 4096, "deepspeed": None,
                 "report_to": "none"}
    cfg = load_config(path, overrides)
    r = train(cfg, log=lambda *_: None)
    assert r.steps == 1 and r.losses and r.losses[0] == r.losses[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_takes_the_packed_row_path_as_written(path):
    """The fast path needs no flag a user would not know: every shipped config trains packed rows as written."""
    cfg = load_config(path)
    assert cfg.data_flatten or cfg.data_packing
    assert cfg.warmup_shapes == "lazy" and cfg.compile_layers == "auto" and cfg.cuda_graphs == "auto"
