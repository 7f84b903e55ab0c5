"""CUDA graphs for the compiled decoder layers (``cuda_graphs``): what they need computes what the plain path does.

On CPU: padded rows (one label-free padding sample per row), the row length as the attention's longest-sample bound,
standing ``.grad`` tensors and the loop's step marks, against the plain path. The graphs themselves replay only on
a GPU: the last test runs there with ``QVL_TRY_CUDA_GRAPHS=1`` and is skipped elsewhere (on torch 2.11 the graphs
crashed the process in the first backward, so ``cuda_graphs`` stays off unless that variable asks to try).
"""

from __future__ import annotations

import os

import pytest
import torch

from qvl.data.packing import pad_row, padded_length
from qvl.train import speed
from qvl.train.loop import train
from qvl.train.track import read_metrics

quiet = {"log": lambda *_: None}


def test_padded_length():
    assert [padded_length(n, 256) for n in (1, 255, 256, 257)] == [256, 256, 256, 512]
    assert padded_length(37, 1) == 37 and padded_length(37, 0) == 37


def test_pad_row_adds_one_label_free_sample():
    positions = torch.cat([torch.arange(3), torch.arange(2)]).expand(4, 1, 5)
    batch = {"input_ids": torch.arange(5)[None] + 10, "mm_token_type_ids": torch.zeros(1, 5, dtype=torch.long),
             "labels": torch.arange(5)[None], "position_ids": positions, "pixel_values": torch.ones(2, 3)}
    out = pad_row(batch, 8, pad_id=0)
    assert out["input_ids"].tolist() == [[10, 11, 12, 13, 14, 0, 0, 0]]
    assert out["labels"][0, 5:].tolist() == [-100] * 3
    assert out["position_ids"].shape == (4, 1, 8)
    assert (out["position_ids"][:, 0, 5:] == torch.arange(3)).all()  # its own sample: positions restart at 0
    assert out["pixel_values"] is batch["pixel_values"]
    assert batch["input_ids"].shape == (1, 5)  # the input is left as it was
    assert pad_row(batch, 5, pad_id=0) is batch


def test_padded_rows_give_the_same_loss_and_gradients(make_cfg):
    """per_sample attention with the bounds as inputs; padded to multiples of 64 with the row as the bound."""
    from train_helpers import make_colour_data

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.data.registry import load_mixture
    from qvl.models.load import load
    from qvl.train import components as comp
    from qvl.train.loop import Encoder, LossModule, pack_micro_batch

    import tempfile
    from pathlib import Path

    data = make_colour_data(Path(tempfile.mkdtemp()), 6, seed=3, text_only=2)
    cfg = make_cfg(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True)
    torch.manual_seed(0)
    model, processor = load(cfg.model_name_or_path)
    model = comp.apply_training_mode(model, cfg)
    model.train()
    use_packed_attention(model, "per_sample")
    enc = Encoder(load_mixture(cfg.dataset_use, None, seed=cfg.seed), processor, cfg)
    rows = [[enc(0), enc(6), enc(1)], [enc(2), enc(7)]]
    rope = rope_index_fn(model)
    pad_id = processor.tokenizer.pad_token_id

    def run(lm, multiple):
        model.zero_grad()
        batches = [pack_micro_batch(r, rope, multiple, pad_id) for r in rows]
        n = float(sum(int((b["labels"] != -100).sum()) for b in batches))
        total = 0.0
        for b in batches:
            loss, part = lm(b, n)
            loss.backward()
            total += float(part)
        return total / n, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}, batches

    ref_loss, ref_grads, plain = run(LossModule(model, bounds_as_inputs=True), 0)
    loss, grads, padded = run(LossModule(model, bounds_as_inputs=True, row_bound=True), 64)
    assert all(b["input_ids"].shape[-1] % 64 == 0 for b in padded)
    assert any(p["input_ids"].shape != b["input_ids"].shape for p, b in zip(plain, padded))
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads) and grads
    worst = max((grads[k] - ref_grads[k]).abs().max().item() / (ref_grads[k].abs().max().item() + 1e-12)
                for k in grads)
    assert worst < 1e-4


def test_cuda_graphs_stay_off_unless_asked_to_try(monkeypatch):
    """They crashed on torch 2.11 (docs/benchmarks.md): asking for them says so and trains without them."""
    monkeypatch.delenv(speed.TRY_CUDA_GRAPHS, raising=False)
    on, why = speed.cuda_graphs_choice(True, True, "layer", torch.device("cuda"), 1, True)
    assert not on and "QVL_TRY_CUDA_GRAPHS=1" in why and "crashed" in why


def test_cuda_graphs_choice_says_why_not(monkeypatch):
    monkeypatch.setenv(speed.TRY_CUDA_GRAPHS, "1")
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert speed.cuda_graphs_choice(False, True, "layer", gpu, 1, True) == (False, "")
    assert "CUDA" in speed.cuda_graphs_choice(True, True, "layer", cpu, 1, True)[1]
    assert "compile_scope=layer" in speed.cuda_graphs_choice(True, True, "parts", gpu, 1, True)[1]
    assert "compile_layers" in speed.cuda_graphs_choice(True, False, "layer", gpu, 1, True)[1]
    assert "one process" in speed.cuda_graphs_choice(True, True, "layer", gpu, 2, True)[1]
    assert "per_sample" in speed.cuda_graphs_choice(True, True, "layer", gpu, 1, False)[1]
    assert speed.cuda_graphs_choice(True, True, "layer", gpu, 1, True) == (True, "on")


def test_standing_grads_are_added_into():
    p = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    assert speed.standing_grads([p, frozen]) == 1 and frozen.grad is None
    held = p.grad
    (p * 2).sum().backward()
    (p * 3).sum().backward()
    assert p.grad is held and p.grad.tolist() == [5.0] * 3


def test_loop_with_graph_settings_trains_like_plain(make_cfg, tmp_path, monkeypatch):
    """The loop's side of cuda_graphs on CPU (padded rows built in the workers and in the loop, the row bound,
    standing gradients zeroed between steps, a step mark per micro-batch): the plain loop's losses and gradient
    norms. The graphs are what the GPU test adds."""
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "data", 8, seed=5, text_only=3)
    kw = dict(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True, packed_attention="per_sample",
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, save_strategy="no",
              compile_layers=False)
    tokens = {"plain": [], "graphs": []}

    def counter(name):
        return lambda step, row: tokens[name].append(round(row["tokens_per_s"] * row["elapsed_s"]))

    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), **kw), callbacks=[counter("plain")], **quiet)
    marks = []
    monkeypatch.setattr(speed, "cuda_graphs_choice", lambda *a: (True, "on"))
    monkeypatch.setattr(speed, "cuda_graph_step", lambda: marks.append(1))
    graphed = train(make_cfg(output_dir=str(tmp_path / "graphs"), cuda_graphs=True, cuda_graphs_row_multiple=128,
                             **kw), callbacks=[counter("graphs")], **quiet)
    assert len(marks) == 3 * 2  # one per micro-batch
    assert graphed.losses == pytest.approx(plain.losses, rel=1e-4)
    ga = [r["grad_norm"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    gb = [r["grad_norm"] for r in read_metrics(tmp_path / "graphs" / "metrics.jsonl")]
    assert gb == pytest.approx(ga, rel=1e-3)
    assert tokens["graphs"] == tokens["plain"] and tokens["plain"]  # padding is not counted as tokens trained on


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get(speed.TRY_CUDA_GRAPHS) != "1",
                    reason="CUDA graphs replay on a GPU, and only when QVL_TRY_CUDA_GRAPHS=1 (they crashed on torch 2.11)")
def test_cuda_graphs_train_like_compiled_layers_on_a_gpu(make_cfg, tmp_path):
    """Compiled whole layers with and without CUDA graphs, bf16 on the flash varlen kernel: the same losses (bf16
    tolerance), and the graphs did replay (inductor skipped none)."""
    from torch._dynamo.utils import counters

    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "data", 24, seed=6, text_only=6)
    kw = dict(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True, bf16=True,
              per_device_train_batch_size=4, max_steps=12, save_strategy="no", compile_layers=True,
              gradient_checkpointing=True, gradient_checkpointing_ratio=1.0, num_train_epochs=3)
    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), **kw), **quiet)
    torch._dynamo.reset()
    counters.clear()
    graphed = train(make_cfg(output_dir=str(tmp_path / "graphs"), cuda_graphs=True, cuda_graphs_row_multiple=64,
                             **kw), **quiet)
    skips = dict(counters["inductor"]).get("cudagraph_skips", 0)
    assert skips == 0, dict(counters["inductor"])
    assert graphed.losses == pytest.approx(plain.losses, rel=2e-2, abs=2e-2)
