"""Fixtures for training tests: a tiny colour dataset (the model must look at the image) and a config factory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import COLOURS, QUESTION, make_colour_data  # noqa: E402,F401

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


@pytest.fixture(autouse=True)
def _dynamo_settings_restored():
    """compile_layers sets dynamo's process-wide suppress_errors and specialize_float, and LoRA dropout on CUDA
    inductor's fallback_random (train() restores them; tests that call it directly get them restored here), so no
    test leaks them into the next."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    with dynamo_config.patch(suppress_errors=dynamo_config.suppress_errors,
                             specialize_float=dynamo_config.specialize_float), \
            inductor_config.patch(fallback_random=inductor_config.fallback_random):
        yield
