"""Mixture-of-experts models (qwen3_vl_moe, the 30B-A3B / 235B-A22B architecture) on a tiny MoE build:
LoRA reaches the experts, training runs and saves a loadable adapter, two FSDP2 ranks match one, and
serving falls back to model.generate."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qvl.errors import QvlError
from qvl.train import components as comp
from qvl.train.config import build_config
from qvl.train.loop import train
from qvl.train.track import read_metrics
from train_helpers import make_colour_data, run_two_ranks

ROOT = Path(__file__).resolve().parents[2]
needs_ds = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                              reason="DeepSpeed is not installed (pip install deepspeed)")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from qvl.models.build import build_tiny

    out = tmp_path_factory.mktemp("moe") / "tiny-moe"
    build_tiny(out, variant="moe")
    return out


def _values(moe_dir, data, out, **kw):
    values = {"model_name_or_path": str(moe_dir), "dataset_use": data, "output_dir": str(out),
              "lora_enable": True, "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-3,
              "per_device_train_batch_size": 2, "max_steps": 3, "save_steps": 1000, "report_to": "none", "seed": 0,
              "lr_scheduler_type": "constant", "max_pixels": 4096, "min_pixels": 4096}
    values.update(kw)
    return values


def test_lora_reaches_the_experts(moe_dir, tmp_path):
    from qvl.models.load import load_model

    data = make_colour_data(tmp_path / "d", 4)
    model = load_model(moe_dir)
    cfg = build_config(_values(moe_dir, data, tmp_path / "o"))
    assert comp.expert_targets(model, cfg) == list(comp.EXPERT_PARAMETERS)
    wrapped = comp.apply_training_mode(model, cfg)
    trained = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert any(".mlp.experts." in n and ".lora_" in n for n in trained)
    assert all(comp.component_of(n) == "llm" for n in trained)
    off = build_config(_values(moe_dir, data, tmp_path / "o", lora_experts=False))
    assert comp.expert_targets(load_model(moe_dir), off) == []
    with pytest.raises(QvlError, match="dropout"):
        comp.apply_training_mode(load_model(moe_dir), build_config(_values(moe_dir, data, tmp_path / "o",
                                                                            lora_dropout=0.05)))


def test_moe_lora_trains_saves_and_serves(moe_dir, tmp_path):
    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.infer.types import Request
    from qvl.models.load import load

    data = make_colour_data(tmp_path / "d", 6)
    out = tmp_path / "run"
    result = train(build_config(_values(moe_dir, data, out)), log=lambda *_: None)
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    model, processor = load(out)  # base + adapter (experts included)
    model = model.merge_and_unload()
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    notes = []
    engine = TransformersEngine(model, processor, name="moe", say=notes.append)
    try:
        assert engine.batcher is not None, notes  # the merged experts are plain again: the fast decode path
        from qvl.data.samples import Message

        r = engine.generate(Request([Message("user", ["hello"])], engine.sampling(temperature=0, max_new_tokens=4)))
        assert r.completion_tokens == 4
    finally:
        engine.close()


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("zero2", marks=needs_ds), pytest.param("zero3", marks=needs_ds)])
def test_moe_two_ranks_match_one(moe_dir, tmp_path, engine):
    """LoRA on attention + experts, trained vision tower, mixed text/image batches: 2 ranks = 1 rank."""
    data = make_colour_data(tmp_path / "d", 8, text_only=4)
    key = {"fsdp": "full_shard"} if engine == "fsdp" else {"deepspeed": str(ROOT / "examples" / "deepspeed" /
                                                                              f"{engine}.json")}
    values = _values(moe_dir, data, tmp_path / "one", per_device_train_batch_size=1, tune_mm_vision=True,
                     vision_tower_lr=1e-4, **key)
    one = train(build_config({**values, "gradient_accumulation_steps": 2}), log=lambda *_: None)
    out = tmp_path / "two"
    args = [f"{k}={v}" for k, v in values.items() if k != "output_dir"] + [f"output_dir={out}"]
    p = run_two_ranks(args)
    assert p.returncode == 0, p.stderr[-3000:]
    two = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert two == pytest.approx(one.losses, rel=1e-4, abs=1e-4)


def test_moe_rows_regrouped_train_the_same_and_the_log_names_the_lever(moe_dir, tmp_path, monkeypatch):
    """packed_row_tokens on a MoE model (each row reads every expert's weights): a step's samples regrouped into one
    row train as one row per sample does (routing is per token, attention per sample); auto, the default, regroups
    a MoE model's rows and says so; null, a step of several micro-batches says what the regrouping would save."""
    from qvl.train import batches

    built = []
    pack = batches.pack_micro_batch
    monkeypatch.setattr(batches, "pack_micro_batch", lambda encs, *a, **k: built.append(len(encs)) or pack(encs, *a, **k))
    data = make_colour_data(tmp_path / "d", 8)
    runs, said, rows_built = {}, {}, {}
    for name, rows in (("one a sample", None), ("regrouped", 100_000), ("auto", "auto")):
        said[name], built[:] = [], []
        cfg = build_config(_values(moe_dir, data, tmp_path / name, data_flatten=True, per_device_train_batch_size=1,
                                   gradient_accumulation_steps=4, packed_row_tokens=rows, dataloader_num_workers=0))
        runs[name] = train(cfg, log=said[name].append).losses
        rows_built[name] = list(built)
    assert rows_built == {"one a sample": [1] * 12, "regrouped": [4] * 3, "auto": [4] * 3}  # 3 steps of 4 samples
    assert runs["regrouped"] == pytest.approx(runs["one a sample"], rel=1e-4)
    assert runs["auto"] == pytest.approx(runs["regrouped"], rel=1e-6)
    assert any("packed_row_tokens auto: a step's samples in rows of up to 8,192 tokens" in str(s) for s in said["auto"])
    hint = "packed_row_tokens=null: each of a step's 4 micro-batches is a row of its own"
    assert any(hint in str(s) for s in said["one a sample"])
    assert not any("packed_row_tokens=null" in str(s) for s in said["regrouped"])
