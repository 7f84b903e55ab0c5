"""CUDA graphs of the decoder stack (``cuda_graphs``, :mod:`qvl.train.graphs`): what they need computes what the plain
path does.

On CPU: padded rows (one label-free padding sample per row), the row length as the attention's longest-sample bound,
standing ``.grad`` tensors, the loop with the graphs' settings, against the plain path (``test_graphs.py`` checks the
recorded computation itself). The graphs record and replay only on a GPU: the last test runs there and is skipped
elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from qvl.data.packing import graph_row_length, pad_row, padded_length
from qvl.train import batches, graphs
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
    # a row already at a multiple still gets a padding segment: k samples always make k + 1 segments
    assert graph_row_length(5, 5) == 10 and graph_row_length(4, 5) == 5
    assert pad_row(batch, 5, pad_id=0)["input_ids"].shape == (1, 10)


def test_padded_rows_give_the_same_loss_and_gradients(make_cfg):
    """per_sample attention with the bounds as inputs; padded to multiples of 64 with the row as the bound."""
    from train_helpers import make_colour_data, packed_lora_model

    from qvl.train.batches import pack_micro_batch
    from qvl.train.loss_module import LossModule

    import tempfile
    from pathlib import Path

    data = make_colour_data(Path(tempfile.mkdtemp()), 6, seed=3, text_only=2)
    cfg = make_cfg(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True)
    model, processor, enc, rope = packed_lora_model(cfg)
    rows = [[enc(0), enc(6), enc(1)], [enc(2), enc(7)]]
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


def test_planned_row_shapes_are_the_shapes_pad_row_makes():
    from qvl.train.graphs import planned_row_shapes

    # 30 tokens + a padding segment -> 32 (4 bounds); 32 tokens get a whole padding multiple; 5 tokens -> 16
    assert planned_row_shapes([[10, 20], [32], [5], [], [20, 10]], 16) == [(48, 3), (32, 4), (16, 3)]


def test_planned_rows_are_the_rows_the_loop_packs(make_cfg, tmp_path):
    """The rows recorded ahead of training (cuda_graphs) come from the plan's order and the token estimate: for
    images and text the estimate is exact, so the planned rows are the encoded rows, micro-batch by micro-batch."""
    from train_helpers import make_colour_data

    from qvl.data.lengths import TokenEstimate
    from qvl.data.registry import load_mixture
    from qvl.models.load import load_processor
    from qvl.data.packing import graph_row_length
    from qvl.train.batches import Encoder, Plan, longest_planned_row, planned_rows
    from qvl.train.loop import Dist

    data = make_colour_data(tmp_path / "data", 10, seed=2, text_only=3)
    cfg = make_cfg(dataset_use=data, data_flatten=True, per_device_train_batch_size=3, num_train_epochs=3,
                   max_steps=8)
    records = load_mixture(cfg.dataset_use, None, seed=cfg.seed)
    processor = load_processor(cfg.model_name_or_path)
    encoder = Encoder(records, processor, cfg)
    plan = Plan(len(records), cfg, Dist(), lengths=TokenEstimate(records, processor, encoder.budget))
    planned = planned_rows(plan, 1, 5)
    real = []
    for step in range(1, min(6, plan.total_steps)):  # across an epoch's end
        epoch, micro = plan.step_micro(step)
        for j in micro:
            real.append([len(e) for i in plan.micro_batch(epoch, j, plan.epoch_order(epoch)) for e in encoder.samples(i)])
    assert planned == real and len(real) >= 5 and [33] in real, (planned, real, plan.total_steps)
    # packed_row_tokens: a step's samples (one micro-batch here) regrouped by the loop's rule, from the estimates
    budget = 80
    regrouped = [[row[i] for i in r] for row in real for r in batches.row_groups(row, budget)]
    assert planned_rows(plan, 1, 5, budget) == regrouped and len(regrouped) > len(real), regrouped
    # what gradient_checkpointing_ratio auto sizes kept layers for: the longest planned row, padded as graphs pad it
    every = [sum(r) for r in planned_rows(plan, 0, plan.total_steps)]
    assert longest_planned_row(plan, cfg) == graph_row_length(max(every), cfg.cuda_graphs_row_multiple)
    assert longest_planned_row(plan, cfg.model_copy(update={"cuda_graphs": False})) == max(every)
    assert longest_planned_row(plan, cfg.model_copy(update={"data_flatten": False})) is None  # padded batches


def test_cuda_graphs_choice_says_why_not():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert graphs.cuda_graphs_choice(False, gpu, 1, True, True) == (False, "")
    assert "CUDA" in graphs.cuda_graphs_choice(True, cpu, 1, True, True)[1]
    assert "one process" in graphs.cuda_graphs_choice(True, gpu, 2, True, True)[1]
    assert "per_sample" in graphs.cuda_graphs_choice(True, gpu, 1, False, True)[1]
    assert "varlen" in graphs.cuda_graphs_choice(True, gpu, 1, True, False)[1]
    assert graphs.cuda_graphs_choice(True, gpu, 1, True, True) == (True, "on")
    # auto: where it was measured, and said when not
    assert graphs.cuda_graphs_choice("auto", cpu, 1, True, True) == (False, "")
    assert graphs.cuda_graphs_choice("auto", gpu, 2, True, True) == (False, "")  # DDP: quiet under auto
    assert graphs.cuda_graphs_choice("auto", gpu, 1, True, True, total_gib=80) == (True, "auto")
    assert "compile_layers" in graphs.cuda_graphs_choice("auto", gpu, 1, True, True, compiled=False)[1]
    assert "LoRA" in graphs.cuda_graphs_choice("auto", gpu, 1, True, True, lora=False)[1]
    assert "LoRA" in graphs.cuda_graphs_choice("auto", gpu, 1, True, True, upstream_trains=True)[1]
    assert "24 GiB card" in graphs.cuda_graphs_choice("auto", gpu, 1, True, True, total_gib=24)[1]
    # the rows the plan makes: the text YAML's (8,192 tokens, padded) keep them, the video YAML's do not
    assert graphs.cuda_graphs_choice("auto", gpu, 1, True, True, total_gib=80, row_tokens=8448) == (True, "auto")
    off = graphs.cuda_graphs_choice("auto", gpu, 1, True, True, total_gib=141, row_tokens=15616)
    assert not off[0] and "rows of up to 15,616 tokens" in off[1] and "true forces it" in off[1]
    assert graphs.cuda_graphs_choice(True, gpu, 1, True, True, row_tokens=15616) == (True, "on")
    assert graphs.cuda_graphs_choice(True, gpu, 1, True, True, compiled=False, total_gib=24) == (True, "on")


def test_standing_grads_are_added_into():
    p = torch.nn.Parameter(torch.ones(3))
    frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    assert graphs.standing_grads([p, frozen]) == 1 and frozen.grad is None
    held = p.grad
    (p * 2).sum().backward()
    (p * 3).sum().backward()
    assert p.grad is held and p.grad.tolist() == [5.0] * 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no GPU is (a GPU would record)")
def test_loop_with_graph_settings_trains_like_plain(make_cfg, tmp_path, monkeypatch):
    """The loop's side of cuda_graphs on CPU (padded rows built in the workers and in the loop, the row bound,
    standing gradients zeroed between steps, the graphs' forward installed, falling back on CPU): the plain loop's
    losses and gradient norms. The recordings are what the GPU test adds."""
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "data", 8, seed=5, text_only=3)
    kw = dict(dataset_use=data, data_flatten=True, tune_mm_llm=False, lora_enable=True, packed_attention="per_sample",
              per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, save_strategy="no",
              compile_layers=False)
    tokens = {"plain": [], "graphs": []}

    def counter(name):
        return lambda step, row: tokens[name].append(row["tokens"])

    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), **kw), callbacks=[counter("plain")], **quiet)
    said = []
    monkeypatch.setattr(graphs, "cuda_graphs_choice", lambda *a, **k: (True, "on"))
    graphed = train(make_cfg(output_dir=str(tmp_path / "graphs"), cuda_graphs=True, cuda_graphs_row_multiple=128,
                             **kw), callbacks=[counter("graphs")], log=said.append)
    assert "cuda_graphs: a forward ran without graphs: not one packed row of embeddings on a GPU" in said
    assert ("cuda_graphs: 0 replays of 0 recordings (0 row shapes kept, 0.0 s recording (compilation apart), "
            "rows up to 0 tokens); 6 without graphs") in said
    assert graphed.losses == pytest.approx(plain.losses, rel=1e-4)
    ga = [r["grad_norm"] for r in read_metrics(tmp_path / "plain" / "metrics.jsonl")]
    gb = [r["grad_norm"] for r in read_metrics(tmp_path / "graphs" / "metrics.jsonl")]
    assert gb == pytest.approx(ga, rel=1e-3)
    assert tokens["graphs"] == tokens["plain"] and tokens["plain"]  # padding is not counted as tokens trained on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs record and replay on a GPU")
def test_cuda_graphs_train_like_compiled_layers_on_a_gpu(make_cfg, tmp_path):
    """Compiled whole layers with and without CUDA graphs, bf16 on the flash varlen kernel, recompute inside: the same
    losses (bf16 tolerance), every forward replayed (none fell back)."""
    from train_helpers import make_colour_data

    data = make_colour_data(tmp_path / "data", 24, seed=6, text_only=6)
    kw = dict(dataset_use=data, data_flatten=True, tune_mm_llm=False, tune_mm_mlp=False, lora_enable=True, lora_r=8,
              lora_alpha=16, bf16=True,
              per_device_train_batch_size=4, max_steps=12, save_strategy="no", compile_layers=True,
              gradient_checkpointing=True, gradient_checkpointing_ratio=0.5, gradient_checkpointing_scope="mlp",
              num_train_epochs=3, packed_attention="per_sample")
    plain = train(make_cfg(output_dir=str(tmp_path / "plain"), cuda_graphs=False, **kw), **quiet)
    said = []
    # warmup_shapes=ahead: every shape recorded and met before step 1 (the default, lazy, ran the 8B CLI rows of
    # bench/results/train_cli.json on an H200)
    graphed = train(make_cfg(output_dir=str(tmp_path / "graphs"), cuda_graphs=True, cuda_graphs_row_multiple=64,
                             warmup_shapes="ahead", **kw), log=said.append)
    summary = next(line for line in said if line.startswith("cuda_graphs: ") and "replays" in line)
    # gemm_row_multiple auto on a GPU: tower patches and loss-head rows padded, their shapes met before training
    assert any(line.startswith("gemm_row_multiple=128 (auto)") for line in said), said
    assert any(line.startswith("gemm_row_multiple: ran the loss head at its") for line in said), said
    assert "without graphs" not in summary and not summary.startswith("cuda_graphs: 0 replays"), said
    # every row's shape was recorded before the first step (the estimate is exact for images and text)
    ahead = next(line for line in said if "row shapes ahead" in line)
    n_ahead = int(ahead.split("recorded ")[1].split()[0])
    assert f"of {n_ahead} recordings" in summary, (ahead, summary)
    assert graphed.losses == pytest.approx(plain.losses, rel=2e-2, abs=2e-2)
