"""``cuda_graphs`` (:mod:`qvl.train.graphs`): what a recording holds computes what the text model's own forward does.

On CPU: the recorded computation (:func:`decoder_stack`, dense deepstack features, the row length as the attention
bound) against the text model's forward on padded packed rows with images, outputs and LoRA gradients; and the
eager fallback for rows it cannot replay. The recording and replay need a GPU: ``test_cuda_graphs.py`` trains with them
there (skipped elsewhere).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from qvl.train.graphs import DecoderGraphs, decoder_stack, deepstack_count


@pytest.fixture
def lora_model_and_rows(make_cfg):
    from train_helpers import make_colour_data, packed_lora_model

    from qvl.train.batches import pack_micro_batch

    data = make_colour_data(Path(tempfile.mkdtemp()), 6, seed=3, text_only=2)
    cfg = make_cfg(dataset_use=data, data_flatten=True, tune_mm_llm=False, tune_mm_mlp=False, lora_enable=True)
    model, processor, enc, rope = packed_lora_model(cfg)
    pad_id = processor.tokenizer.pad_token_id
    rows = [pack_micro_batch([enc(0), enc(6), enc(1)], rope, 64, pad_id),
            pack_micro_batch([enc(7)], rope, 64, pad_id)]  # text only: no deepstack
    return model, rows


def row_and_reference(model, batch):
    """The packed row's embeddings, positions, bounds and dense deepstack features (as row_forward makes them), and
    transformers' final hidden states for it."""
    from qvl.data.packing import sample_bounds_inputs

    inner = model.get_base_model().model
    batch = {k: v for k, v in batch.items() if k not in ("labels", "padding") and not k.startswith("qvl_")}
    bounds = sample_bounds_inputs(batch["position_ids"], row_bound=True)
    reference = inner(**batch, **bounds, use_cache=False).last_hidden_state
    ids = batch["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    deepstack = []
    if "pixel_values" in batch:
        out = inner.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"], return_dict=True)
        mask = (ids == model.config.image_token_id)[..., None].expand_as(embeds)
        embeds = embeds.masked_scatter(mask, out.pooler_output)
        deepstack = [torch.zeros_like(embeds).masked_scatter_(mask, f) for f in out.deepstack_features]
    return embeds, batch["position_ids"], bounds["qvl_cu_seqlens"], deepstack, reference


def lora_grads(model, output: torch.Tensor) -> dict:
    model.zero_grad()
    (output.float() ** 2).mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", [0, 1], ids=["images", "text-only"])
def test_decoder_stack_is_the_text_models_forward(lora_model_and_rows, which):
    model, rows = lora_model_and_rows
    embeds, positions, cu, deepstack, reference = row_and_reference(model, rows[which])
    n = deepstack_count(model.config)
    assert n > 0 and len(deepstack) == (n if which == 0 else 0)
    assert embeds.shape[1] % 64 == 0  # padded as the loop pads for graphs
    ref_grads = lora_grads(model, reference)
    text = model.get_base_model().model.language_model
    out = decoder_stack(text, embeds.detach(), positions[1:], positions[0], cu, deepstack, embeds.shape[1])
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = lora_grads(model, out)
    assert set(grads) == set(ref_grads) and grads
    assert all(k.count("lora_") for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_rows_it_cannot_replay_run_eagerly_and_say_why(lora_model_and_rows):
    """On CPU every row runs decoder_stack eagerly (no GPU); each reason is said once."""
    model, rows = lora_model_and_rows
    said = []
    graphs = DecoderGraphs(model, log=said.append)
    embeds, positions, cu, deepstack, reference = row_and_reference(model, rows[0])
    out = graphs(embeds.detach(), positions, cu, deepstack)
    again = graphs(embeds.detach(), positions, cu, deepstack)
    with torch.no_grad():
        graphs(embeds.detach(), positions, cu, deepstack)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, out)
    assert said == ["cuda_graphs: a forward ran without graphs: not one packed row of embeddings on a GPU",
                    "cuda_graphs: a forward ran without graphs: not training (no gradients)"]
    assert graphs.replays == 0 and sum(graphs.fallbacks.values()) == 3


def test_only_trainable_decoder_weights_are_recorded(lora_model_and_rows):
    model, _ = lora_model_and_rows
    graphs = DecoderGraphs(model)
    names = {id(p): n for n, p in model.named_parameters()}
    recorded = [names[id(p)] for p in graphs.params]
    assert recorded and all("lora_" in n and ".language_model." in n for n in recorded)
    assert len(recorded) == sum(p.requires_grad for n, p in model.named_parameters() if ".language_model." in n)


def test_a_trained_vision_part_keeps_the_graphs_off(lora_model_and_rows):
    """The recording takes the embedded row as a constant: a trainable merger would get no gradient."""
    model, _ = lora_model_and_rows
    assert DecoderGraphs(model).upstream_trains == []
    merger = next(p for n, p in model.named_parameters() if ".visual.merger." in n)
    merger.requires_grad_(True)
    try:
        graphs = DecoderGraphs(model)
        assert graphs.upstream_trains and graphs.upstream_trains[0].endswith(".visual")
        assert graphs.unfit(torch.zeros(1, 4, 8), []) == "not one packed row of embeddings on a GPU"  # CPU first
    finally:
        merger.requires_grad_(False)


def test_a_recording_compiles_one_decoder_graph_for_every_layer(lora_model_and_rows):
    """The recorded stack gives layer 0 an input that requires a gradient, as every later layer gets: the compiled
    layer is one graph, never a second one for layer 0 (a recompile on ``requires_grad``: ~40-60 s at 8B)."""
    import torch._dynamo

    from qvl.train.compile import compile_layers, uncompile
    from qvl.train.graphs import StaticRow, recorded_stack

    model, rows = lora_model_and_rows
    embeds, positions, cu, deepstack, reference = row_and_reference(model, rows[0])
    text = model.get_base_model().model.language_model
    row = StaticRow(hidden=embeds.detach().clone(), mrope=positions[1:], text_positions=positions[0], cu_seqlens=cu,
                    deepstack=[d.detach() for d in deepstack], output=torch.empty_like(embeds),
                    grad_output=torch.empty_like(embeds))
    torch._dynamo.reset()
    compile_layers(model, backend="eager", scope="layer")
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = recorded_stack(text, row)
            torch.autograd.grad(out.float().pow(2).mean(), [p for p in text.parameters() if p.requires_grad])
    finally:
        uncompile(model)
        torch._dynamo.reset()
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
