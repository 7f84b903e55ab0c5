import json
import shutil

import pytest

from qvl.errors import QvlError
from qvl.models.load import load_model, resolve


def test_class_comes_from_config_not_folder_name(tiny_model_dir, tmp_path):
    # a folder named like a MoE / Qwen2 checkpoint still loads as what config.json says
    odd = tmp_path / "qwen2.5-vl-30b-a3b-output"
    shutil.copytree(tiny_model_dir, odd)
    assert type(load_model(odd)).__name__ == "Qwen3VLForConditionalGeneration"
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "llava"
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(QvlError, match="not a Qwen3-VL model"):
        load_model(odd)


def test_offline_without_local_copy_says_how_to_get_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(QvlError) as e:
        resolve("Qwen/Qwen3-VL-8B-Instruct")
    msg = e.value.render()
    assert "huggingface-cli download Qwen/Qwen3-VL-8B-Instruct" in msg and "--model" in msg


def test_folder_without_config(tmp_path):
    with pytest.raises(QvlError, match="no config.json"):
        resolve(tmp_path)
