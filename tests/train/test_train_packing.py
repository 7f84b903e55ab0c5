"""Packed / flattened training: one row per micro-batch computes what padded training computes.

CPU tests use sdpa for packed rows (transformers builds a block-diagonal mask from the 4-row
position_ids); flex attention's backward pass needs a GPU. Tolerances: losses rel 1e-5, gradients
max |diff| / max |grad| < 1e-4 per parameter (fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from qvl.errors import QvlError
from qvl.train.loop import train
from qvl.train.track import read_metrics

quiet = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory):
    from train_helpers import make_colour_data

    return make_colour_data(tmp_path_factory.mktemp("mixed"), 12, seed=3, text_only=4)


def _setup(cfg):
    from qvl.data.registry import load_mixture
    from qvl.models.load import load
    from qvl.train import components as comp
    from qvl.train.batches import Encoder
    from qvl.train.loss_module import LossModule

    torch.manual_seed(0)
    model, processor = load(cfg.model_name_or_path)
    model = comp.apply_training_mode(model, cfg)
    model.train()
    records = load_mixture(cfg.dataset_use, None, seed=cfg.seed)
    return model, processor, LossModule(model), Encoder(records, processor, cfg)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_flattened_equals_padded_loss_and_grads(make_cfg, mixed_data):
    """Same 8 samples (image + text-only) in 2 accumulated micro-batches: padded rows vs one packed row each."""
    from qvl.data.collate import collate
    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.data.preprocess import IGNORE_INDEX
    from qvl.train.batches import pack_micro_batch

    cfg = make_cfg(dataset_use=mixed_data, tune_mm_vision=True)
    model, processor, lm, enc = _setup(cfg)
    encs = [enc(i) for i in (0, 13, 1, 2, 14, 3, 4, 5)]  # text-only samples inside both micro-batches
    groups = [encs[:4], encs[4:]]
    pad = processor.tokenizer.pad_token_id

    padded = [collate(g, pad) for g in groups]
    n_labels = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in padded))
    model.zero_grad()
    ref = 0.0
    for b in padded:
        loss, part = lm(dict(b), n_labels)
        loss.backward()
        ref += float(part)
    ref_grads = _grads(model)

    assert use_packed_attention(model, "sdpa") == "sdpa"
    packed = [pack_micro_batch(g, rope_index_fn(model)) for g in groups]
    assert all(b["input_ids"].shape[0] == 1 and b["attention_mask"] is None for b in packed)
    assert sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in packed) == n_labels  # same label tokens
    assert sum(b["input_ids"].numel() for b in packed) == sum(len(e) for e in encs)  # no padding
    model.zero_grad()
    got = 0.0
    for b in packed:
        loss, part = lm(dict(b), n_labels)
        loss.backward()
        got += float(part)
    grads = _grads(model)
    assert got / n_labels == pytest.approx(ref / n_labels, rel=1e-5)
    assert set(grads) == set(ref_grads)
    worst = max((grads[n] - ref_grads[n]).abs().max().item() / (ref_grads[n].abs().max().item() + 1e-12)
                for n in grads)
    assert worst < 1e-4, worst


def test_text_only_packed_row_still_reaches_the_vision_tower(make_cfg, mixed_data):
    """The dummy-vision trick: a packed row without pixels gives every trainable vision weight a (zero) grad."""
    from qvl.data.packing import rope_index_fn
    from qvl.train.batches import pack_micro_batch

    cfg = make_cfg(dataset_use=mixed_data, tune_mm_vision=True, data_flatten=True)
    model, _, lm, enc = _setup(cfg)
    batch = pack_micro_batch([enc(12), enc(13), enc(14)], rope_index_fn(model))
    assert "pixel_values" not in batch
    model.zero_grad()
    loss, _ = lm(batch, 10.0)
    loss.backward()
    visual = [(n, p) for n, p in model.named_parameters() if p.requires_grad and ".visual." in f".{n}"]
    assert visual and all(p.grad is not None for _, p in visual)


def test_flatten_trains_like_padded(make_cfg, mixed_data, tmp_path):
    """Same data, seeds and steps: the default (packed rows, data_flatten) gives the padded run's loss curve and
    gradient norms; padded batches say what they cost."""
    kw = dict(dataset_use=mixed_data, tune_mm_vision=True, per_device_train_batch_size=4,
              gradient_accumulation_steps=2, max_steps=4, save_strategy="no")
    padded_logs, logs = [], []
    a = train(make_cfg(output_dir=str(tmp_path / "padded"), data_flatten=False, **kw), log=padded_logs.append)
    assert any(line.startswith("data_flatten=false: padded batches") for line in padded_logs)
    b = train(make_cfg(output_dir=str(tmp_path / "flat"), **kw), log=logs.append)  # the default
    assert any("packed rows with sdpa attention" in line for line in logs)
    assert not any(line.startswith("data_flatten=false") for line in logs)
    assert b.losses == pytest.approx(a.losses, rel=1e-4)
    assert b.losses[-1] < b.losses[0]  # it learns
    ga = [r["grad_norm"] for r in read_metrics(tmp_path / "padded" / "metrics.jsonl")]
    gb = [r["grad_norm"] for r in read_metrics(tmp_path / "flat" / "metrics.jsonl")]
    assert gb == pytest.approx(ga, rel=1e-3)


def _write_packs(tmp_path, data: str, groups) -> str:
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    root = str(Path(data).parent.resolve())
    out = tmp_path / "packed.jsonl"
    out.write_text("".join(json.dumps([{**rows[i], "data_path": root} for i in g]) + "\n" for g in groups))
    return str(out)


def test_offline_packs_train_as_one_row_each(make_cfg, mixed_data, tmp_path):
    """A packed file (records = lists of samples): 2 packs x 4 samples in one step == 8 samples flattened."""
    packs = _write_packs(tmp_path, mixed_data, [[0, 1, 12, 2], [3, 13, 4, 5]])
    common = dict(tune_mm_vision=True, max_steps=1, save_strategy="no", gradient_accumulation_steps=1)
    logs = []
    p = train(make_cfg(dataset_use=packs, data_packing=True, per_device_train_batch_size=2,
                       output_dir=str(tmp_path / "packs"), **common), log=logs.append)
    assert any("2 packs" in line and "packs/step" in line for line in logs)
    (tmp_path / "f").mkdir()
    flat = _write_packs(tmp_path / "f", mixed_data, [[i] for i in (0, 1, 12, 2, 3, 13, 4, 5)])  # packs of one
    f = train(make_cfg(dataset_use=flat, data_packing=True, per_device_train_batch_size=8,
                       output_dir=str(tmp_path / "flat"), **common), **quiet)
    assert p.losses[0] == pytest.approx(f.losses[0], rel=1e-5)
    gp = read_metrics(tmp_path / "packs" / "metrics.jsonl")[0]["grad_norm"]
    gf = read_metrics(tmp_path / "flat" / "metrics.jsonl")[0]["grad_norm"]
    assert gp == pytest.approx(gf, rel=1e-4)
    # a packed file without data_packing is refused with the fix
    with pytest.raises(QvlError, match="data_packing"):
        train(make_cfg(dataset_use=packs, output_dir=str(tmp_path / "no"), **common), **quiet)


def test_qvl_data_pack_output_trains(make_cfg, tmp_path, tiny_model_dir, monkeypatch):
    """`qvl data pack` output, registered like any dataset, trains with data_packing (every pack one row)."""
    from train_helpers import make_colour_data

    from qvl.cli.main import app

    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    data = make_colour_data(tmp_path / "src", 10, seed=5, text_only=3)
    out = tmp_path / "packed.jsonl"
    res = CliRunner().invoke(app, ["data", "pack", data, "--model", str(tiny_model_dir), "--max-length", "120",
                                   "--max-pixels", "4096", "--min-pixels", "4096", "--out", str(out)])
    assert res.exit_code == 0, res.output
    reg = tmp_path / "datasets.yaml"
    reg.write_text(f"colours_packed:\n  annotation_path: {out}\n")
    n_packs = len(out.read_text().splitlines())
    assert 3 <= n_packs < 13
    r = train(make_cfg(dataset_use="colours_packed", dataset_registry=str(reg), data_packing=True,
                       per_device_train_batch_size=1, max_steps=n_packs, save_strategy="no",
                       output_dir=str(tmp_path / "run")), **quiet)
    assert len(r.losses) == n_packs and not r.skipped
    assert r.losses[-1] < r.losses[0]


def test_packed_attention_choice(monkeypatch):
    from qvl.data import packing
    from qvl.train.loop import packed_attention_for

    cpu = torch.device("cpu")
    assert packed_attention_for("auto", cpu) == "sdpa"
    assert packed_attention_for("sdpa", cpu) == "sdpa"
    with pytest.raises(QvlError, match="GPUs only"):
        packed_attention_for("flex", cpu)
    with pytest.raises(QvlError, match="packed_attention"):
        packed_attention_for("flash_attention_2", cpu)
    import importlib.util

    real_find_spec = importlib.util.find_spec
    cuda = torch.device("cuda", 0)
    for flash_attn_installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: (
            (object() if flash_attn_installed else None) if name == "flash_attn" else real_find_spec(name, *a, **k)))
        monkeypatch.setattr(packing, "_VARLEN", ("varlen", True))
        # torch's varlen kernel, what the fast path is built on, also when flash-attn is installed
        assert packed_attention_for("auto", cuda, max_row_tokens=4 * 4096) == "per_sample"
        monkeypatch.setattr(packing, "_VARLEN", None)  # an older torch
        if flash_attn_installed:
            assert packed_attention_for("auto", cuda) == "flash_attention_2"
        else:
            assert packed_attention_for("auto", cuda, max_row_tokens=4 * 4096) == "sdpa"  # dense mask is small
            assert packed_attention_for("auto", cuda, max_row_tokens=8 * 8192) == "flex"  # no L x L mask at long L
            assert packed_attention_for("auto", cuda) == "flex"


def test_config_keys(make_cfg):
    from qvl.train.config import build_config

    cfg = make_cfg(data_flatten=True, packed_attention="sdpa")
    assert cfg.data_flatten and cfg.packed_attention == "sdpa" and "data_flatten" not in cfg.ignored
    with pytest.raises(QvlError, match="packed_attention"):
        build_config({**cfg.model_dump(), "packed_attention": "xformers"})


def test_loader_workers_default():
    from qvl.train.loop import loader_workers

    assert loader_workers(3, torch.device("cpu")) == 3
    assert loader_workers(None, torch.device("cpu")) == 0  # CPU training: workers would compete with compute
    import os

    if (os.cpu_count() or 1) >= 6:
        assert loader_workers(None, torch.device("cuda", 0)) == min(4, os.cpu_count() - 2)
    else:
        assert loader_workers(None, torch.device("cuda", 0)) == 0


def test_per_sample_attention_trains_like_sdpa_mask(make_cfg, mixed_data, tmp_path):
    """packed_attention: per_sample through qvl train gives the block-mask sdpa run's losses."""
    from qvl.train.loop import train

    runs = {}
    for impl in ("sdpa", "per_sample"):
        cfg = make_cfg(dataset_use=mixed_data, data_flatten=True, packed_attention=impl, max_steps=3,
                       output_dir=str(tmp_path / impl), save_strategy="no")
        runs[impl] = train(cfg, log=lambda *a, **k: None).losses
    assert runs["per_sample"] == pytest.approx(runs["sdpa"], rel=1e-4)
