"""`qvl train`'s memory preflight: config -> planner settings, refusal before loading, --force, fake GPU sizes."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from qvl.errors import QvlError
from qvl.train.loop import train
from qvl.train.preflight import plan_kwargs, train_fix


def test_config_maps_to_plan_settings(make_cfg, tmp_path):
    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    cfg = make_cfg(lora_enable=True, lora_r=16, lora_alpha=32, tune_mm_llm=False, tune_mm_mlp=True,
                   gradient_checkpointing=True, per_device_train_batch_size=2, model_max_length=4096,
                   max_pixels=200_704, deepspeed=str(ds))
    kw = plan_kwargs(cfg, world_size=4, video=True)
    assert kw["method"] == "lora" and kw["lora_r"] == 16 and kw["lora_targets"] == "all"
    assert (kw["zero"], kw["offload"], kw["gpus"]) == (3, True, 4)
    assert (kw["batch"], kw["seq_len"], kw["max_pixels"]) == (2, 4096, 200_704)
    assert kw["gradient_checkpointing"] and kw["tune_mm_mlp"] and not kw["tune_mm_vision"]
    assert kw["video_max_frames"] == cfg.video_max_frames
    assert plan_kwargs(cfg)["video_max_frames"] == 0 and plan_kwargs(cfg)["zero"] == 3
    full = plan_kwargs(make_cfg())
    assert full["method"] == "full" and full["tune_mm_llm"] and "lora_r" not in full
    regex = plan_kwargs(make_cfg(lora_enable=True, tune_mm_llm=False,
                                 lora_target_regex=r".*language_model.*\.(q_proj|v_proj)"))
    assert regex["lora_targets"] == "q,v"
    visual = [plan_kwargs(make_cfg(lora_enable=True, tune_mm_llm=False, lora_targets=t))["lora_targets"]
              for t in (["vision"], ["llm", "merger"])]
    assert visual == ["vision", "all,merger"]  # vision-only LoRA: no LLM adapters planned


def test_recommendations_become_train_keys(make_cfg):
    from qvl.plan.memory import Recommendation

    cfg = make_cfg(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert train_fix(Recommendation("", {"batch": 2}, 10.0, True), cfg) == \
        "per_device_train_batch_size=2 gradient_accumulation_steps=4 (→ 10.0 GiB)"
    assert train_fix(Recommendation("", {"batch": 3}, 10.0, True), cfg).startswith(  # keeps 8 samples per step
        "per_device_train_batch_size=2 gradient_accumulation_steps=4")
    assert train_fix(Recommendation("", {"seq_len": 1024, "gradient_checkpointing": True}, 5.0, True), cfg) == \
        "model_max_length=1024 gradient_checkpointing=true (→ 5.0 GiB)"
    assert train_fix(Recommendation("", {"method": "qlora"}, 5.0, True), cfg) == \
        "lora_enable=true tune_mm_llm=false quantization=nf4 (→ 5.0 GiB)"  # QLoRA: qvl.train.quantize


def test_refuses_before_loading_with_numbers_and_fix(make_cfg, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier run")
    logs = []
    with pytest.raises(QvlError) as e:
        train(make_cfg(output_dir=str(out), gpu_mem="1GiB", resume=False), log=logs.append)
    err = e.value
    assert err.where == "memory preflight"
    assert "does not fit" in err.what and "of 1.0 GiB" in err.what
    assert "force" in err.fix and "=" in err.fix  # a qvl train key to set, or --force
    assert any(line.startswith("memory preflight: does not fit") for line in logs)
    assert not any(line.startswith("model ") for line in logs)  # stopped before the model loaded
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # nothing moved aside


def test_force_trains_anyway_and_fits_says_so(make_cfg, tmp_path, monkeypatch):
    logs = []
    r = train(make_cfg(output_dir=str(tmp_path / "a"), gpu_mem="1GiB", force=True, max_steps=1,
                       save_strategy="no"), log=logs.append)
    assert r.steps == 1 and any("force=true: trying anyway" in line for line in logs)
    monkeypatch.setenv("QVL_GPU_MEM", "80GiB")  # the environment variable names the card too
    logs = []
    train(make_cfg(output_dir=str(tmp_path / "b"), max_steps=1, save_strategy="no", model_max_length=2048),
          log=logs.append)
    assert any(line.startswith("memory preflight: fits") for line in logs)


def test_no_gpu_skips(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("QVL_GPU_MEM", raising=False)
    monkeypatch.delenv("QVL_GPU", raising=False)
    logs = []
    train(make_cfg(output_dir=str(tmp_path / "a"), max_steps=1, save_strategy="no"), log=logs.append)
    assert "memory preflight skipped: no CUDA device" in logs


def test_cli_refuses_then_force(make_cfg, tmp_path, monkeypatch):
    from qvl.cli.main import app

    cfg = make_cfg(output_dir=str(tmp_path / "run"), max_steps=1, save_strategy="no")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    monkeypatch.setenv("QVL_GPU_MEM", "1GiB")
    res = CliRunner().invoke(app, ["train", str(path)])
    assert res.exit_code != 0
    assert "does not fit" in res.output and "--force" in res.output
    res = CliRunner().invoke(app, ["train", str(path), "--force"])
    assert res.exit_code == 0, res.output
    assert "trying anyway" in res.output and "done: 1 steps" in res.output


def test_auto_checkpoint_ratio_follows_the_card(make_cfg, tmp_path):
    """auto: every layer recomputed without a plan (CPU); none on a card with room; some when memory is tight."""
    from qvl.plan.memory import layer_saved_bytes_per_token
    from qvl.plan.preflight import model_for_plan
    from qvl.train.preflight import AUTO_CHECKPOINT_BUDGET, auto_checkpoint_ratio, check

    cfg = make_cfg(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True, per_device_train_batch_size=2,
                   model_max_length=512)
    assert cfg.gradient_checkpointing_ratio == "auto"
    assert auto_checkpoint_ratio(cfg, None)[:2] == (1.0, None)
    roomy = check(cfg, gpu="h100", say=lambda *a: None)
    ratio, _, why = auto_checkpoint_ratio(cfg, roomy)
    assert ratio == 0.0 and "0 of" in why
    shape = model_for_plan(cfg.model_name_or_path)
    layer_gib = layer_saved_bytes_per_token(shape, cfg.lora_r, ("q", "k", "v", "o", "gate", "up", "down"),
                                            cfg.lora_dropout) * 2 * 512 / 2**30
    # a card where the all-recomputed plan leaves room for exactly one layer's kept activations
    total = roomy.plan.total_gib
    tight_mem = (total + 1.5 * layer_gib) / AUTO_CHECKPOINT_BUDGET
    tight = check(make_cfg(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True,
                           per_device_train_batch_size=2, model_max_length=512, gpu_mem=f"{tight_mem:.6f}GiB"),
                  say=lambda *a: None)
    ratio, _, why = auto_checkpoint_ratio(cfg, tight)
    assert ratio == (shape.layers - 1) / shape.layers, why
    ratio_tight = ratio
    # rows capped at half the tokens (packed_row_tokens): each kept layer costs half, three fit (both layers kept)
    capped = make_cfg(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True, per_device_train_batch_size=2,
                      model_max_length=512, data_flatten=True, packed_row_tokens=512)
    ratio, _, why = auto_checkpoint_ratio(capped, tight)
    assert shape.layers == 2 and ratio == 0.0 and "rows up to 512 tokens" in why, why
    # the rows the run's plan makes (row_tokens) count the same way, never above what a micro-batch can make
    assert auto_checkpoint_ratio(cfg, tight, row_tokens=512)[0] == 0.0
    assert auto_checkpoint_ratio(cfg, tight, row_tokens=10**6)[0] == ratio_tight


def test_auto_budget_for_compiled_layers(make_cfg):
    """Whole compiled layers: every layer kept under the loosest budget that fits (the compiler's own partition, then
    activation_memory_budget 0.8), then 0.8 with the fewest layers recomputed whole."""
    from qvl.plan.memory import COMPILED_BUDGETS, compiled_layer_saved_bytes_per_token
    from qvl.plan.preflight import model_for_plan
    from qvl.train.preflight import AUTO_CHECKPOINT_BUDGET, auto_checkpoint_ratio, check

    kw = dict(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True, per_device_train_batch_size=2,
              model_max_length=512, data_flatten=True, lora_target_regex=r".*\.(q_proj|k_proj|v_proj|o_proj)")
    cfg = make_cfg(**kw)
    shape = model_for_plan(cfg.model_name_or_path)
    total = check(cfg, gpu="h100", say=lambda *a: None).plan.total_gib
    per_layer = {b: compiled_layer_saved_bytes_per_token(shape, b, cfg.lora_r, 4) * 1024 / 2**30
                 for b in COMPILED_BUDGETS}
    assert COMPILED_BUDGETS == (None, 0.8) and per_layer[None] > per_layer[0.8]

    def card(free_gib):
        pf = check(make_cfg(**kw, gpu_mem=f"{(total + free_gib) / AUTO_CHECKPOINT_BUDGET:.6f}GiB"),
                   say=lambda *a: None)
        return pf

    n = shape.layers
    for budget in COMPILED_BUDGETS:  # room for every layer at this budget, not at the looser one
        ratio, got, why = auto_checkpoint_ratio(cfg, card(n * per_layer[budget] * 1.01), row_tokens=1024,
                                                compiled=True)
        assert (ratio, got) == (0.0, budget), why
    ratio, got, why = auto_checkpoint_ratio(cfg, card(1.5 * per_layer[0.8]), row_tokens=1024, compiled=True)
    assert (ratio, got) == ((n - 1) / n, 0.8) and "activation_memory_budget 0.8" in why, why
    # no room for one kept layer: every layer recomputed whole, and no budget (it would govern nothing)
    ratio, got, why = auto_checkpoint_ratio(cfg, card(0.5 * per_layer[0.8]), row_tokens=1024, compiled=True)
    assert (ratio, got) == (1.0, None) and "activation_memory_budget" not in why, why
    # LoRA dropout: only the compiler's own partition (below 1 it may redraw the mask in backward)
    dropout = make_cfg(**kw, lora_dropout=0.05)
    ratio, got, why = auto_checkpoint_ratio(dropout, card(n * per_layer[0.8] * 1.01), row_tokens=1024, compiled=True)
    assert got is None and ratio > 0 and "activation_memory_budget" not in why, why
    # ... and a kept layer then holds its dropout's outputs too: room for every layer without them is not enough
    room = card(n * per_layer[None] * 1.01)
    assert auto_checkpoint_ratio(cfg, room, row_tokens=1024, compiled=True)[:2] == (0.0, None)
    ratio, got, why = auto_checkpoint_ratio(dropout, room, row_tokens=1024, compiled=True)
    assert ratio > 0 and got is None, why


def test_memory_cap_names_the_card_to_fit(make_cfg, monkeypatch):
    """gpu_mem / QVL_GPU_MEM / QVL_GPU name the card the run must fit: its size (the cap itself is applied on a GPU
    larger than that card, where torch's allocator is limited to it); nothing named, no cap."""
    import torch

    from qvl.train.preflight import cap_memory

    for var in ("QVL_GPU_MEM", "QVL_GPU"):
        monkeypatch.delenv(var, raising=False)
    cpu = torch.device("cpu")
    assert cap_memory(make_cfg(), cpu) == (None, "")
    assert cap_memory(make_cfg(gpu_mem="24GiB"), cpu) == (24.0, "")
    monkeypatch.setenv("QVL_GPU", "rtx4090")
    assert cap_memory(make_cfg(), cpu)[0] == pytest.approx(23.6)
    monkeypatch.setenv("QVL_GPU_MEM", "32GiB")  # the memory wins over the card's name
    assert cap_memory(make_cfg(), cpu)[0] == 32.0


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a GPU (the cap limits its allocator)")
def test_memory_cap_limits_the_allocator_on_a_gpu(make_cfg):
    import torch

    from qvl.train.preflight import cap_memory

    device = torch.device("cuda", 0)
    try:
        gib, note = cap_memory(make_cfg(gpu_mem="4GiB"), device)
        assert gib == 4.0 and "capped at 4.0 GiB" in note
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(4.5 * 2**30), dtype=torch.uint8, device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def test_recomputed_layers_under_dropout_stay_whole(make_cfg):
    """Where the auto plan recomputes layers under LoRA dropout, whole compiled layers stay whole (their dropout runs
    eager kernels: qvl.train.compile.eager_random_ops), planned as such, as with every layer kept or no dropout; a
    compile_scope the user set is kept."""
    from types import SimpleNamespace

    import torch

    from qvl.plan.memory import compiled_layer_saved_bytes_per_token
    from qvl.plan.preflight import model_for_plan
    from qvl.train.loop import _plan_recompute
    from qvl.train.preflight import AUTO_CHECKPOINT_BUDGET, check

    kw = dict(lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True, per_device_train_batch_size=2,
              model_max_length=512, data_flatten=True, packed_attention="per_sample", compile_layers=True,
              gradient_checkpointing_scope="layer",  # the loop resolves "auto" to it before planning
              lora_dropout=0.05, lora_target_regex=r".*\.(q_proj|k_proj|v_proj|o_proj)")
    cfg = make_cfg(**kw)
    total = check(cfg, gpu="h100", say=lambda *a: None).plan.total_gib
    targets = ("q", "k", "v", "o")  # each keeps its dropped input and mask
    per_layer = compiled_layer_saved_bytes_per_token(model_for_plan(cfg.model_name_or_path), None, cfg.lora_r, 4,
                                                     dropout_targets=targets)
    assert per_layer > compiled_layer_saved_bytes_per_token(model_for_plan(cfg.model_name_or_path), None, cfg.lora_r, 4)
    per_layer *= 1024 / 2**30

    def planned(free_gib: float, **extra):
        card = check(make_cfg(**kw, gpu_mem=f"{(total + free_gib) / AUTO_CHECKPOINT_BUDGET:.6f}GiB"),
                     say=lambda *a: None)
        said: list[str] = []
        run = SimpleNamespace(cfg=make_cfg(**{**kw, **extra}), say=said.append, memory_plan=card,
                              dist=SimpleNamespace(world_size=1), records=(), longest_row=1024,
                              device=torch.device("cpu"))
        _plan_recompute(run)
        return run, " / ".join(said)

    roomy, said = planned(100.0)
    assert roomy.ckpt_ratio == 0.0 and roomy.cfg.compile_scope == "layer" and "compile_scope" not in said
    for extra in ({}, dict(compile_scope="layer"), dict(lora_dropout=0.0)):
        tight, said = planned(0.1 * per_layer, **extra)
        assert tight.ckpt_ratio == 1.0 and tight.cfg.compile_scope == "layer" and "compile_scope" not in said
    kept, said = planned(0.1 * per_layer, compile_scope="parts")
    assert kept.cfg.compile_scope == "parts"


def test_memory_other_processes_hold_is_left_out_of_the_plan(make_cfg, monkeypatch):
    """A GPU of which another process holds 17.4 GiB: the run plans within the rest (the card the planner detects
    and the size the run trains within), and says so; a process holding less than 1 GiB (a display) is not
    counted. An 8B LoRA run planned for the whole H100 beside such a process ran out of memory at step ~50."""
    import types

    import torch

    from qvl.plan import gpus
    from qvl.train.preflight import cap_memory

    for var in ("QVL_GPU_MEM", "QVL_GPU"):
        monkeypatch.delenv(var, raising=False)
    gib = 2**30
    props = types.SimpleNamespace(total_memory=int(79.2 * gib), name="NVIDIA H100 80GB HBM3", major=9)
    free = {"bytes": int((79.2 - 17.4 - 0.5) * gib)}  # another process's 17.4 GiB, this one's CUDA context
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free["bytes"], props.total_memory))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=0: 0)
    card = gpus.detect_gpu()
    assert card.total_gib == pytest.approx(61.8) and "17.4 of its 79.2 GiB held by other processes" in card.label
    device = torch.device("cuda", 0)
    left, note = cap_memory(make_cfg(), device)
    assert left == pytest.approx(61.8) and "other processes hold 17.4 GiB" in note and "61.8 GiB left" in note
    assert cap_memory(make_cfg(gpu_mem="80GiB"), device)[0] == pytest.approx(61.8)  # more than is left
    free["bytes"] = int((79.2 - 0.6 - 0.5) * gib)  # 0.6 GiB elsewhere: the driver's, a display's
    assert gpus.detect_gpu().total_gib == pytest.approx(79.2)
    assert cap_memory(make_cfg(), device) == (None, "")


def test_video_rows_from_the_data_are_planned(make_cfg):
    """Packed rows of video samples: the plan is made for the rows the data makes, whose clips hold fewer visual
    tokens than the budget's worst case (16 frames of video_max_pixels / 16). That worst case above the row used to
    make the planner decline: the run had no preflight and recomputed every layer."""
    from qvl.train.preflight import auto_checkpoint_ratio, check

    class Video:
        raw = {"video": ["clip.mp4"]}

    cfg = make_cfg(model_name_or_path="Qwen/Qwen3-VL-8B-Instruct", lora_enable=True, tune_mm_llm=False,
                   tune_mm_mlp=False, per_device_train_batch_size=1, model_max_length=16384, data_flatten=True,
                   gradient_checkpointing=True, video_max_frames=16, video_max_pixels=16 * 2304 * 1024)
    lines = []
    pf = check(cfg, records=[Video()], gpu="H100", row_tokens=15616, say=lines.append)
    assert pf is not None and pf.plan.fits, lines
    assert "packed rows up to 15,616 tokens" in lines[0]
    ratio, _, why = auto_checkpoint_ratio(cfg, pf, records=[Video()], row_tokens=15616)
    assert 0 < ratio < 1, why  # layers kept where the card has room
    # rows as long as model_max_length, or longer (padded for CUDA graphs): planned too, at their length
    for row in (16384, 16640):
        pf = check(cfg, records=[Video()], gpu="H100", row_tokens=row, say=lines.append)
        assert pf is not None and f"packed rows up to {row:,} tokens" in lines[-1]
    with pytest.raises(QvlError, match="does not fit") as refused:  # a card it does not fit is told so, with fixes
        check(cfg, records=[Video()], gpu="RTX4090", row_tokens=15616, say=lines.append)
    assert "quantization=nf4" in refused.value.fix
    from qvl.plan.memory import plan_train
    from qvl.plan.preflight import model_for_plan
    from qvl.train.preflight import _rows, plan_kwargs

    shape = model_for_plan(cfg.model_name_or_path)
    plan = plan_train(shape.name, _shape=shape, gpu="RTX4090", **_rows(cfg, plan_kwargs(cfg, 1, True), 15616))
    assert 1024 < plan.max_seq_len_that_fits < 15616  # shorter rows, with their fewer visual tokens, are searched


def test_auto_rows_regroup_a_moe_models_steps_only(make_cfg):
    """packed_row_tokens auto: rows of up to 8,192 tokens (a micro-batch's batch x model_max_length if longer) for a
    MoE model on packed rows with several samples a step, said in a line; null for a dense model, padded batches or
    one sample a step; an explicit value is kept."""
    from qvl.train.preflight import MOE_ROW_TOKENS, auto_row_budget

    moe = "Qwen/Qwen3-VL-30B-A3B-Instruct"  # an official id: the planner knows its shape without a download

    def rows(**kw):
        cfg, line = auto_row_budget(make_cfg(**kw))
        return cfg.packed_row_tokens, line

    budget, line = rows(model_name_or_path=moe, per_device_train_batch_size=1, gradient_accumulation_steps=16)
    assert budget == MOE_ROW_TOKENS == 8192 and "rows of up to 8,192 tokens" in line and "packed_row_tokens=null" in line
    assert rows(model_name_or_path=moe, model_max_length=16384, per_device_train_batch_size=1,
                gradient_accumulation_steps=2)[0] == 16384
    # never shorter than a micro-batch's own row: batch 4 x 4,096 tokens stays one row of up to 16,384
    assert rows(model_name_or_path=moe, model_max_length=4096, per_device_train_batch_size=4)[0] == 16384
    assert rows(model_name_or_path=moe, per_device_train_batch_size=1, gradient_accumulation_steps=1) == (None, None)
    assert rows(model_name_or_path=moe, data_flatten=False) == (None, None)
    assert rows(model_name_or_path="Qwen/Qwen3-VL-8B-Instruct") == (None, None)
    assert rows() == (None, None)  # the tiny dense model
    assert rows(model_name_or_path=moe, packed_row_tokens=None) == (None, None)
    assert rows(model_name_or_path=moe, packed_row_tokens=2048) == (2048, None)
    assert make_cfg().packed_row_tokens == "auto"  # a config not resolved yet plans the rows the run will make
    assert make_cfg().longest_row() == 4 * make_cfg().model_max_length
    assert make_cfg(model_name_or_path=moe, per_device_train_batch_size=1, gradient_accumulation_steps=16,
                    model_max_length=4096).longest_row() == 8192


def test_a_card_too_small_for_the_rows_is_told_the_rows_that_fit(make_cfg):
    """A mixture-of-experts run whose auto rows (8,192 tokens) do not fit the card but shorter ones do: the refusal's
    first fix is the longest budget that fits, of the halvings down to model_max_length and model_max_length itself,
    each planned as the run pads its rows for CUDA graphs (on by default)."""
    from qvl.data.packing import graph_row_length
    from qvl.plan.preflight import model_for_plan, preflight_train
    from qvl.train.preflight import _rows, check, plan_kwargs, shorter_rows

    moe = "Qwen/Qwen3-VL-30B-A3B-Instruct"
    kw = dict(model_name_or_path=moe, lora_enable=True, tune_mm_llm=False, gradient_checkpointing=True,
              per_device_train_batch_size=1, gradient_accumulation_steps=16, model_max_length=2048)
    cfg = make_cfg(**kw)
    assert cfg.row_budget() == 8192 and cfg.cuda_graphs == "auto"
    shape = model_for_plan(moe)

    def padded(row: int) -> int:  # as qvl.train.batches.longest_planned_row pads a run's longest row
        return graph_row_length(row, cfg.cuda_graphs_row_multiple)

    def total(row: int) -> float:
        return preflight_train(shape, force=True, gpu_mem=1000.0, **_rows(cfg, plan_kwargs(cfg, 1, False), row)
                               ).plan.total_gib

    assert total(padded(2048)) < total(4096) < total(padded(4096)) < total(padded(8192))
    # a card where padded 4,096-token rows just fit and 8,192 do not; unpadded planning would suggest 4,096 anyway
    between = (total(padded(4096)) + total(padded(8192))) / 2
    tight = make_cfg(**kw, gpu_mem=f"{between:.3f}GiB")
    assert shorter_rows(tight, row_tokens=padded(8192)) == 4096
    with pytest.raises(QvlError, match="does not fit") as refused:
        check(tight, row_tokens=padded(8192), say=lambda *a: None)
    assert refused.value.fix.startswith("set packed_row_tokens=4096")
    assert check(make_cfg(**kw, packed_row_tokens=4096, gpu_mem=f"{between:.3f}GiB"), row_tokens=padded(4096),
                 say=lambda *a: None).plan.fits
    # rows padded as planned: a card between the unpadded and the padded 4,096-token rows gets no 4,096 suggestion
    squeezed = make_cfg(**kw, gpu_mem=f"{(total(4096) + total(padded(4096))) / 2:.3f}GiB")
    assert shorter_rows(squeezed, row_tokens=padded(8192)) == 2048
    # model_max_length itself is tried after the halvings: 3,000 after 4,096
    odd = {**kw, "model_max_length": 3000}
    assert shorter_rows(make_cfg(**odd, gpu_mem=f"{(total(padded(3000)) + total(padded(4096))) / 2:.3f}GiB"),
                        row_tokens=padded(8192)) == 3000
    # no shorter budget that still holds a whole sample fits: nothing suggested
    assert shorter_rows(make_cfg(**kw, gpu_mem=f"{total(2048) * 0.9:.3f}GiB"), row_tokens=padded(8192)) is None
    assert shorter_rows(make_cfg(**{**kw, "model_max_length": 8192}, gpu_mem=f"{between:.3f}GiB"),
                        row_tokens=padded(8192)) is None
