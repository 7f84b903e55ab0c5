"""One packed row through Qwen3-VL with its host-side facts made when packed (:mod:`qvl.train.row_forward`): the
losses and LoRA gradients of transformers' forward, for rows with images, a video and image together, text only,
padded or not; the label positions and vision inputs made on the CPU equal what transformers derives."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from qvl.train.row_forward import EXTRA_PREFIX, row_extras, take_extras

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from helpers import write_image, write_video  # noqa: E402


def mixed_data(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "wide.png", 160, 64)
    write_image(folder / "small.png", 48, 48, colour=(30, 200, 30))
    write_video(folder / "v.mp4", frames=12, fps=4, w=96, h=64)

    def turn(prompt, answer):
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]

    rows = [{"image": "wide.png", "conversations": turn("<image>\nWhat colour?", "red")},
            {"video": "v.mp4", "conversations": turn("<video>\nWhat happens?", "it brightens")},
            {"image": ["small.png", "wide.png"], "conversations": turn("<image> and <image>: same?", "no, not at all")},
            {"conversations": turn("Say yes.", "yes")},
            {"conversations": turn("Count to three.", "one two three")}]
    path = folder / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def setup(make_cfg, tmp_path):
    from train_helpers import packed_lora_model

    cfg = make_cfg(dataset_use=mixed_data(tmp_path / "data"), data_flatten=True, tune_mm_llm=False,
                   tune_mm_mlp=False, lora_enable=True, max_pixels=96 * 96, min_pixels=32 * 32)
    model, processor, enc, rope = packed_lora_model(cfg)
    samples = [enc(i) for i in range(5)]
    assert all(s is not None for s in samples)
    return model, processor, rope, samples


ROWS = {"images": [0, 3, 2], "video+image": [1, 0, 4], "text-only": [3, 4], "video": [1]}


@pytest.mark.parametrize("multiple", [0, 64], ids=["unpadded", "padded"])
@pytest.mark.parametrize("row", list(ROWS))
def test_row_forward_gives_transformers_loss_and_gradients(setup, row, multiple):
    from qvl.train.batches import pack_micro_batch
    from qvl.train.loss_module import LossModule

    model, processor, rope, samples = setup
    batch = pack_micro_batch([samples[i] for i in ROWS[row]], rope, multiple, processor.tokenizer.pad_token_id)
    assert f"{EXTRA_PREFIX}cu_seqlens" in batch and f"{EXTRA_PREFIX}label_index" in batch
    assert (f"{EXTRA_PREFIX}video_cu_seqlens" in batch) == ("video" in row)
    n = float(int((batch["labels"] != -100).sum()))

    def run(use_row_forward: bool):
        lm = LossModule(model, bounds_as_inputs=True, row_bound=multiple > 0)
        assert lm.row_forward  # the tiny Qwen3-VL is one row_forward knows
        lm.row_forward = use_row_forward
        model.zero_grad()
        b = dict(batch)
        if not use_row_forward:  # transformers' forward, as before: no precomputed facts at all
            take_extras(b)
        loss, part = lm(b, n)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), float(part), grads

    ref_loss, ref_part, ref_grads = run(False)
    loss, part, grads = run(True)
    assert loss == pytest.approx(ref_loss, rel=1e-5) and part == pytest.approx(ref_part, rel=1e-5)
    assert set(grads) == set(ref_grads) and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-7)


def test_extras_equal_what_transformers_derives(setup):
    """The tower's inputs made on the CPU are those its forward computes from grid_thw; label positions are where
    the shifted labels are."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids

    from qvl.data.packing import pack

    model, _, rope, samples = setup
    batch = pack([samples[i] for i in (1, 2, 3)], rope)
    extras = row_extras(batch, model.config)
    vision = model.get_base_model().model.visual
    for kind, grid_key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        grid = batch[grid_key]
        assert torch.equal(extras[f"qvl_{kind}_cu_seqlens"], get_vision_cu_seqlens(grid))
        assert torch.equal(extras[f"qvl_{kind}_position_ids"], get_vision_position_ids(grid, vision.spatial_merge_size))
        cu = extras[f"qvl_{kind}_cu_seqlens"]
        assert extras[f"qvl_{kind}_max_seqlen"] == int((cu[1:] - cu[:-1]).max())
    shifted = batch["labels"][0, 1:]
    assert extras["qvl_label_index"].tolist() == [i for i, t in enumerate(shifted.tolist()) if t != -100]
    assert extras["qvl_cu_seqlens"].tolist()[-1] == batch["input_ids"].shape[1]
    assert len(extras["qvl_cu_seqlens"]) == 4  # three samples
    got = take_extras(dict(batch, **extras))
    assert set(got) == {k[len(EXTRA_PREFIX):] for k in extras}


def test_compiled_tower_gives_the_same_loss(setup):
    """compile.compile_vision_tower (the whole forward, undecorated, dynamic shapes) on a row with images and a video:
    transformers' loss; uncompile takes it away."""
    from qvl.train import compile
    from qvl.train.batches import pack_micro_batch
    from qvl.train.loss_module import LossModule

    model, processor, rope, samples = setup
    batch = pack_micro_batch([samples[i] for i in ROWS["video+image"]], rope, 0, processor.tokenizer.pad_token_id)
    n = float(int((batch["labels"] != -100).sum()))
    lm = LossModule(model, bounds_as_inputs=True)
    with torch.no_grad():
        ref = float(lm(dict(batch), n)[0])
        assert compile.compile_vision_tower(model, backend="aot_eager")
        visual = model.get_base_model().model.visual
        assert visual.qvl_compiled_forward is not None
        got = [float(lm(dict(batch), n)[0]) for _ in range(2)]
    compile.uncompile(model)
    assert "qvl_compiled_forward" not in visual.__dict__
    assert got == pytest.approx([ref, ref], rel=1e-5)
    visual.merger.linear_fc1.weight.requires_grad_(True)  # a tower that trains: left alone
    try:
        assert not compile.compile_vision_tower(model, backend="aot_eager")
    finally:
        visual.merger.linear_fc1.weight.requires_grad_(False)


def test_tower_compiled_in_the_background_gives_the_same_loss(setup):
    """compile_vision_tower(background=True): the calls run the tower uncompiled until start() has compiled it in a
    thread (on the first call's inputs, in that call's grad mode), then compiled; the same loss either way, and the
    training thread's call does not compile it again."""
    from torch._dynamo.utils import counters

    from qvl.train import compile
    from qvl.train.batches import pack_micro_batch
    from qvl.train.loss_module import LossModule

    model, processor, rope, samples = setup
    batch = pack_micro_batch([samples[i] for i in ROWS["video+image"]], rope, 0, processor.tokenizer.pad_token_id)
    n = float(int((batch["labels"] != -100).sum()))
    lm = LossModule(model, bounds_as_inputs=True)
    try:
        with torch.no_grad():
            ref = float(lm(dict(batch), n)[0])
            assert compile.compile_vision_tower(model, backend="aot_eager", background=True)
            tower = compile.tower_in_background(model)
            assert tower is not None and not tower.started
            eager = float(lm(dict(batch), n)[0])
            calls = tower.eager_calls  # the row's images, then its video
            assert calls >= 1 and tower.compiled_calls == 0
            assert tower.start() and not tower.start()
            meanwhile = []  # this thread runs the model while the other one traces and compiles
            while not tower.done.is_set() and len(meanwhile) < 20:
                meanwhile.append(float(lm(dict(batch), n)[0]))
            assert tower.wait(timeout=300) and tower.error == ""
            # a row in the loop above may have had its later tower calls compiled (done set between its calls)
            graphs, before = counters["stats"]["unique_graphs"], tower.compiled_calls
            compiled = float(lm(dict(batch), n)[0])
            assert counters["stats"]["unique_graphs"] == graphs  # the thread's graph serves this thread's call
        assert tower.compiled_calls - before == calls and "compiled in the background" in tower.status()
    finally:
        compile.uncompile(model)
    assert compile.tower_in_background(model) is None
    assert [eager, compiled] + meanwhile == pytest.approx([ref] * (2 + len(meanwhile)), rel=1e-5)


@pytest.mark.parametrize("row", ["images", "video+image", "video"])
def test_padded_media_and_loss_rows_give_the_same_loss_and_gradients(setup, row):
    """gemm_row_multiple: each medium's patches grown to a multiple by a padding image (pad_media), the fused loss
    head's rows padded: the loss and LoRA gradients of the unpadded row, on the packed-row path."""
    from qvl.train.batches import pack_micro_batch
    from qvl.train.loss_module import LossModule

    model, processor, rope, samples = setup
    pad_id = processor.tokenizer.pad_token_id
    plain = pack_micro_batch([samples[i] for i in ROWS[row]], rope, 64, pad_id)
    padded = pack_micro_batch([samples[i] for i in ROWS[row]], rope, 64, pad_id, media_multiple=64)
    for pixel_key, grid_key in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        if pixel_key in plain:
            n, grid = plain[pixel_key].shape[0], padded[grid_key]
            assert padded[pixel_key].shape[0] % 64 == 0 and padded[pixel_key].shape[0] > n
            assert int(grid.prod(-1).sum()) == padded[pixel_key].shape[0]  # the padding image is in the grid
            assert grid[-1, :2].tolist() == [1, 2] and not padded[pixel_key][n:].any()
    n_labels = float(int((plain["labels"] != -100).sum()))

    def run(batch, multiple):
        lm = LossModule(model, fused_cross_entropy=True, bounds_as_inputs=True, row_bound=True)
        lm.gemm_row_multiple = multiple
        model.zero_grad()
        loss, _ = lm(dict(batch), n_labels)
        loss.backward()
        return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run(plain, 0)
    loss, grads = run(padded, 8)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert set(grads) == set(ref_grads) and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-7)


def test_warm_tower_runs_every_padded_patch_count(setup, monkeypatch):
    """warm_tower: one tower call per size pad_media can make (gemm_ladder), each of zero images whose grid holds
    exactly that many patches; the tower's output is one merged token per merge x merge patches."""
    from qvl.train import row_forward
    from qvl.train.loss_head import gemm_ladder

    model, _, _, _ = setup
    visual = model.get_base_model().model.visual
    seen, real = [], row_forward.run_tower

    def spy(visual, pixels, grid, kw):
        out = real(visual, pixels, grid, kw)
        seen.append((pixels.shape[0], int(grid.prod(-1).sum()), out.pooler_output.shape[0]))
        return out

    monkeypatch.setattr(row_forward, "run_tower", spy)
    vc = model.config.vision_config
    assert row_forward.warm_tower(visual, vc, 3000, 64, "cpu") == len(gemm_ladder(3000, 64))
    assert [n for n, _, _ in seen] == gemm_ladder(3000, 64)
    merge = vc.spatial_merge_size
    assert all(n == in_grid == merged * merge ** 2 for n, in_grid, merged in seen)


def test_pad_media_needs_whole_merged_tokens():
    from qvl.train.row_forward import pad_media

    batch = {"pixel_values": torch.ones(8, 3), "image_grid_thw": torch.tensor([[1, 2, 4]])}
    assert pad_media(dict(batch), 8, 2)["pixel_values"].shape[0] == 8  # already a multiple: unchanged
    grown = pad_media(dict(batch), 12, 2)
    assert grown["pixel_values"].shape[0] == 12 and grown["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 2]]
    many = {"pixel_values": torch.ones(4 * 37, 3), "image_grid_thw": torch.tensor([[1, 2, 74]])}
    grown = pad_media(many, 4, 2)  # 37 multiples -> 40 (the ladder's step is 4 multiples there)
    assert grown["pixel_values"].shape[0] == 160 and grown["image_grid_thw"][-1].tolist() == [1, 2, 6]
    with pytest.raises(ValueError, match="multiple of 4"):
        pad_media(dict(batch), 6, 2)


def test_inductor_tower_compiles_once_with_its_blocks_as_one_region(setup):
    """inductor on CPU (as on a GPU, save the attention kernel), in a training step's modes (train, grad enabled,
    blocks checkpointed): the compiled tower is one graph, with no fallback to eager in dynamo's records; each block
    runs as one shared region (a block's graph, compiled once); the output equals the eager tower's for one medium
    and then two, the second compiling nothing new; uncompile undoes it."""
    from torch._dynamo.utils import get_compilation_metrics
    from torch._inductor.compile_fx import compile_fx

    from qvl.train import compile
    from qvl.train.row_forward import run_tower, vision_extras

    model, processor, rope, samples = setup
    visual = model.get_base_model().model.visual
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    grids = [torch.tensor([[1, 4, 6]]), torch.tensor([[1, 4, 4], [2, 6, 6]])]  # one medium, then two (longer)

    def tower(grid):
        torch.manual_seed(int(grid.sum()))
        pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim)
        return run_tower(visual, pixels, grid, vision_extras(grid, vc)).pooler_output

    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return compile_fx(gm, inputs)

    from qvl.train.components import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)  # as gradient_checkpointing: true does: the tower's blocks too
    model.train()
    assert all(block.gradient_checkpointing for block in visual.blocks)
    eager = [tower(g).detach() for g in grids]
    mark = compile.compile_marker()
    assert compile.compile_vision_tower(model, backend=backend)
    got = [tower(g).detach() for g in grids]
    records = [m for m in get_compilation_metrics() if id(m) not in mark]
    assert [m.fail_type for m in records] == [None]  # one compile, nothing fell back to eager
    assert len(graphs) == 1
    regions = [n for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(regions) == len(visual.blocks)
    # every block calls the same region (torch 2.11, the GPU's, gives the first block one of its own)
    assert len({n.args[1] for n in regions[1:]}) == 1
    for ours, ref in zip(got, eager):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    compile.uncompile(model)
    assert not any("forward" in block.__dict__ for block in visual.blocks)
    assert all(block.gradient_checkpointing for block in visual.blocks)


def test_inductor_tower_shares_one_region_across_its_blocks(tiny_model_dir):
    """Four blocks, one compiled block graph shared by all four (torch 2.11 traced the first block as a region of
    its own until the rotary inputs' size was said equal to the patches' before it)."""
    from torch._inductor.compile_fx import compile_fx
    from transformers import AutoConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from qvl.models.attention import use_vision_sdpa
    from qvl.train import compile
    from qvl.train.row_forward import run_tower, vision_extras

    config = AutoConfig.from_pretrained(tiny_model_dir)
    vc = config.vision_config
    vc.depth, vc._attn_implementation = 4, "sdpa"
    visual = Qwen3VLVisionModel._from_config(vc).eval().requires_grad_(False)
    holder = torch.nn.Module()
    holder.visual, holder.config = visual, config
    use_vision_sdpa(holder)
    graphs = []
    assert compile.compile_vision_tower(holder, backend=lambda gm, inputs: graphs.append(gm) or compile_fx(gm, inputs))
    grid = torch.tensor([[1, 4, 4]])
    with torch.no_grad():
        run_tower(visual, torch.randn(16, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2), grid,
                  vision_extras(grid, vc))
    regions = [n.args[1] for n in graphs[0].graph.nodes if n.target is torch.ops.higher_order.invoke_subgraph]
    assert len(regions) == 4 and len(set(regions)) == 1
    compile.uncompile(holder)
