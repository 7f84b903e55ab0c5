"""``cuda_graphs`` (:mod:`qvl.train.graphs`): what a recording holds computes what the text model's own forward does.

On CPU: the recorded computation (:func:`decoder_stack`, dense deepstack features, the row length as the attention
bound) against the text model's forward on padded packed rows with images, outputs and LoRA gradients; and the
fallback for calls it cannot replay. The recording and replay need a GPU: ``test_cuda_graphs.py`` trains with them
there (skipped elsewhere).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from qvl.train.graphs import DecoderGraphs, StaticRow, decoder_stack, deepstack_count, fill_deepstack


@pytest.fixture
def lora_model_and_rows(make_cfg):
    from train_helpers import make_colour_data

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.data.registry import load_mixture
    from qvl.models.load import load
    from qvl.train import components as comp
    from qvl.train.loop import Encoder, pack_micro_batch

    data = make_colour_data(Path(tempfile.mkdtemp()), 6, seed=3, text_only=2)
    cfg = make_cfg(dataset_use=data, data_flatten=True, tune_mm_llm=False, tune_mm_mlp=False,
                   lora_enable=True)
    torch.manual_seed(0)
    model, processor = load(cfg.model_name_or_path)
    model = comp.apply_training_mode(model, cfg)
    model.train()
    use_packed_attention(model, "per_sample")
    enc = Encoder(load_mixture(cfg.dataset_use, None, seed=cfg.seed), processor, cfg)
    rope = rope_index_fn(model)
    rows = [pack_micro_batch([enc(0), enc(6), enc(1)], rope, 64, processor.tokenizer.pad_token_id),
            pack_micro_batch([enc(7)], rope, 64, processor.tokenizer.pad_token_id)]  # text only: no deepstack
    return model, rows


def text_model_calls(model, batch):
    """The kwargs the text model's forward gets for ``batch`` (through LossModule's path), and its output."""
    from qvl.data.packing import language_model, sample_bounds_inputs

    text = language_model(model)
    seen = {}
    original = text.forward
    installed = text.__dict__.get("forward")  # DecoderGraphs.install's

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    text.forward = spy
    try:
        inner = model.get_base_model().model
        batch = {k: v for k, v in batch.items() if k not in ("labels", "padding")}
        out = inner(**batch, **sample_bounds_inputs(batch["position_ids"], row_bound=True), use_cache=False)
    finally:
        if installed is None:
            del text.forward
        else:
            text.forward = installed
    return text, seen, out.last_hidden_state


def static_row(text, kwargs, n_deepstack: int) -> StaticRow:
    embeds, positions = kwargs["inputs_embeds"].detach(), kwargs["position_ids"]
    deepstack = [torch.empty_like(embeds) for _ in range(n_deepstack)]
    fill_deepstack(deepstack, kwargs.get("visual_pos_masks"), kwargs.get("deepstack_visual_embeds"))
    return StaticRow(hidden=embeds, mrope=positions[1:], text_positions=positions[0],
                     cu_seqlens=kwargs["qvl_cu_seqlens"], deepstack=deepstack, output=torch.empty_like(embeds),
                     grad_output=torch.empty_like(embeds))


def lora_grads(model, output: torch.Tensor) -> dict:
    model.zero_grad()
    (output.float() ** 2).mean().backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", [0, 1], ids=["images", "text-only"])
def test_decoder_stack_is_the_text_models_forward(lora_model_and_rows, which):
    model, rows = lora_model_and_rows
    text, kwargs, reference = text_model_calls(model, rows[which])
    n = deepstack_count(model.config)
    assert n > 0 and (kwargs.get("deepstack_visual_embeds") is not None) == (which == 0)
    assert kwargs["inputs_embeds"].shape[1] % 64 == 0  # padded as the loop pads for graphs
    ref_grads = lora_grads(model, reference)
    out = decoder_stack(text, static_row(text, kwargs, n))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    grads = lora_grads(model, out)
    assert set(grads) == set(ref_grads) and grads
    assert all(k.count("lora_") for k in grads)
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_fill_deepstack_places_features_in_order():
    mask = torch.tensor([[False, True, False, True, True]])
    features = [torch.arange(6.0).reshape(3, 2), -torch.ones(3, 2)]
    bufs = [torch.full((1, 5, 2), 7.0) for _ in range(2)]
    fill_deepstack(bufs, mask, features)
    assert bufs[0][0].tolist() == [[0, 0], [0, 1], [0, 0], [2, 3], [4, 5]]
    assert (bufs[1][0, mask[0]] == -1).all() and (bufs[1][0, ~mask[0]] == 0).all()
    fill_deepstack(bufs, None, None)
    assert all((b == 0).all() for b in bufs)


def test_calls_it_cannot_replay_run_the_original_forward_and_say_why(lora_model_and_rows):
    """On CPU every call falls back (no GPU); the reason is said once and the output is the original's."""
    model, rows = lora_model_and_rows
    said = []
    graphs = DecoderGraphs(model, log=said.append).install()
    try:
        _, _, out = text_model_calls(model, rows[0])
        _, _, again = text_model_calls(model, rows[0])
        with torch.no_grad():
            text_model_calls(model, rows[1])
    finally:
        graphs.uninstall()
    _, _, reference = text_model_calls(model, rows[0])
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(again, reference)
    assert said == ["cuda_graphs: a forward ran without graphs: not one packed row of embeddings on a GPU",
                    "cuda_graphs: a forward ran without graphs: not training (no gradients)"]
    assert graphs.replays == 0 and sum(graphs.fallbacks.values()) == 3
    assert "forward" not in graphs.text.__dict__  # uninstalled


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
        assert graphs.unfit({}) == "not one packed row of embeddings on a GPU"  # CPU: refused before that
    finally:
        merger.requires_grad_(False)
