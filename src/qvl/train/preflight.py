"""Memory preflight for `qvl train`: the TrainConfig as planner settings, checked before the model loads.

The card is the detected CUDA device, or ``gpu_mem`` (config key) / ``$QVL_GPU_MEM`` (e.g. ``24GiB``) /
``$QVL_GPU`` (a card name from ``qvl plan gpus``) when given; with neither and no CUDA the check is skipped.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qvl.errors import QvlError
from qvl.plan.preflight import model_for_plan
from qvl.train.config import TrainConfig, dropout_in_layers
from qvl.train.optimizers import plan_name

_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def card_args(gpu_mem=None, gpu: str | None = None) -> dict:
    """``gpu`` / ``gpu_mem`` for the planner: explicit values, else $QVL_GPU / $QVL_GPU_MEM, else detect."""
    gpu_mem = gpu_mem if gpu_mem is not None else (os.environ.get("QVL_GPU_MEM") or None)
    gpu = gpu or os.environ.get("QVL_GPU") or None
    return {"gpu": gpu, "gpu_mem": gpu_mem}


def card_gib(cfg: TrainConfig) -> float | None:
    """The memory (GiB) ``gpu_mem`` / ``$QVL_GPU_MEM`` / ``$QVL_GPU`` name, or None when none is given."""
    from qvl.plan.gpus import gpu_from_args

    card = card_args(cfg.gpu_mem)
    if card["gpu"] is None and card["gpu_mem"] is None:
        return None
    return gpu_from_args(card["gpu"], card["gpu_mem"]).total_gib


def cap_memory(cfg: TrainConfig, device) -> tuple[float | None, str]:
    """(GiB the run trains within, note): on a GPU larger than the card ``gpu_mem`` / ``$QVL_GPU_MEM`` / ``$QVL_GPU``
    names, torch's allocator is capped so the run uses no more than that card would have (its CUDA context and
    library workspaces, outside the allocator, counted as the planner counts them): a config that runs under the
    cap fits that card, and one that would not fails here rather than there. (None, '') when no card is named or
    there is no GPU; the card's size and no cap when it is not larger. Memory other processes hold on the GPU is
    not the run's: it plans within what is left (:func:`qvl.plan.gpus.held_by_others_gib`), and the note says so."""
    gib = card_gib(cfg)
    if getattr(device, "type", "cpu") != "cuda":
        return gib, ""
    import torch

    from qvl.plan.gpus import held_by_others_gib
    from qvl.plan.memory import CUDA_CONTEXT_GIB

    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    others = held_by_others_gib(device.index or 0)
    left = (f"other processes hold {others:.1f} GiB of this card's {total:.1f}: this run plans within the "
            f"{total - others:.1f} GiB left" if others else "")
    if gib is None or gib >= total - others:  # nothing named, or more than is left: what is left
        return (total - others if others or gib is not None else None), left
    torch.cuda.set_per_process_memory_fraction(max(gib - CUDA_CONTEXT_GIB, 0.5) / total, device)
    return gib, (f"GPU memory capped at {gib:.1f} GiB of this card's {total:.1f} (gpu_mem / QVL_GPU_MEM / QVL_GPU): "
                 f"torch may allocate {gib - CUDA_CONTEXT_GIB:.1f} GiB, the rest is the CUDA context's")


def zero_settings(cfg: TrainConfig) -> tuple[int, bool]:
    """(ZeRO stage, optimizer offload) from the DeepSpeed JSON, (0, False) without one."""
    if not cfg.deepspeed:
        return 0, False
    try:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    except (OSError, json.JSONDecodeError):
        return 0, False
    zero = ds.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0) or 0)
    offload = any((zero.get(k) or {}).get("device") in ("cpu", "nvme") for k in ("offload_optimizer", "offload_param"))
    return stage, offload and stage > 0


def _lora_targets(cfg: TrainConfig) -> str:
    """What the planner counts LoRA on: the LLM's seven linears for qvl's ``llm`` target, the tower's blocks for
    ``vision``, the merger for ``merger`` (``lora_targets: [vision]`` plans no LLM adapters); or the LLM linears a
    regex names (all seven where it names none of them)."""
    if not cfg.lora_target_regex:
        return ",".join((["all"] if "llm" in cfg.lora_components else [])
                        + [c for c in cfg.lora_components if c != "llm"])
    found = [t for t in _LINEARS if re.search(rf"(?<![a-z]){t}_proj", cfg.lora_target_regex)]
    return ",".join(found) if found else "all"


def disk_needed(trainable_bytes: int, model_bytes: int, lora: bool, start_step: int, total_steps: int,
                save_strategy: str, save_steps: int, save_total_limit: int | None) -> tuple[int, int, str]:
    """(bytes of the run's first write, bytes its new outputs hold at their most, how that adds up), for steps
    ``start_step`` (0, or where a resume starts) to ``total_steps``. A checkpoint holds the trainable weights and
    AdamW's two moments, each the size of the weights (an 8-bit optimizer writes less); a new one is complete
    before the oldest beyond ``save_total_limit`` goes. The trained model: the adapters (LoRA) or every weight
    (``model_bytes``), written at the end in any case."""
    final = trainable_bytes if lora else model_bytes
    checkpoint = 3 * trainable_bytes
    saves = 0
    if save_strategy == "steps" and start_step < total_steps:  # every save_steps steps, and the last step's
        saves = 1 + sum(1 for step in range(start_step + 1, total_steps) if step % save_steps == 0)
    if not saves:
        return final, final, f"the trained model {final / 2**30:.1f} GiB"
    kept = min(saves, save_total_limit + 1) if save_total_limit else saves
    return (checkpoint, kept * checkpoint + final,
            f"{kept} checkpoint{'s' if kept > 1 else ''} of {checkpoint / 2**30:.1f} GiB on disk at once, then the "
            f"trained model {final / 2**30:.1f} GiB")


def has_video(records) -> bool:
    def one(raw) -> bool:
        if isinstance(raw, list):  # a pack
            return any(one(r) for r in raw)
        return isinstance(raw, dict) and bool(raw.get("video") or raw.get("videos"))

    return any(one(r.raw) for r in records)


def master_weights_fp32(cfg: TrainConfig) -> bool:
    from qvl.train.distributed import master_weights_fp32 as fp32

    return fp32(cfg)


def bf16_masters(cfg: TrainConfig) -> bool:
    from qvl.train.distributed import bf16_masters as bf16

    return bf16(cfg)


def plan_kwargs(cfg: TrainConfig, world_size: int = 1, video: bool = False) -> dict:
    """The keyword arguments of :func:`qvl.plan.plan_train` for ``cfg``.

    ``seq_len`` is ``model_max_length`` (the longest row a sample can make); with ``data_flatten`` /
    ``data_packing`` a micro-batch is one row of up to ``batch`` x that, the same token count.
    """
    zero, offload = zero_settings(cfg)
    if cfg.engine == "fsdp":  # FSDP2 full sharding: weights, gradients and states sharded, as ZeRO-3
        zero = 3
    kw = {"method": "lora" if cfg.lora_enable else "full", "zero": zero, "offload": offload,
          "gradient_checkpointing": cfg.gradient_checkpointing, "batch": cfg.per_device_train_batch_size,
          "seq_len": cfg.model_max_length, "max_pixels": cfg.max_pixels,
          "video_max_frames": cfg.video_max_frames if video else 0,
          "video_frame_pixels": max(1, cfg.video_max_pixels // max(1, cfg.video_max_frames)),
          "tune_mm_vision": cfg.tune_mm_vision, "tune_mm_mlp": cfg.tune_mm_mlp,
          "tune_mm_llm": cfg.tune_mm_llm or not cfg.lora_enable, "optim": plan_name(cfg.optim), "gpus": world_size,
          "master_fp32": not cfg.lora_enable and master_weights_fp32(cfg), "fused_ce": cfg.fused_cross_entropy,
          # bf16 masters under ZeRO / FSDP2; bf16 LoRA adapters on one GPU / DDP (master_weights: bf16)
          "master_bf16": (bf16_masters(cfg) and zero >= 1) or (cfg.lora_enable and cfg.engine == "ddp" and cfg.bf16
                                                               and not master_weights_fp32(cfg)),
          "recompute_keeps_attention": cfg.gradient_checkpointing and cfg.gradient_checkpointing_scope == "mlp",
          # "auto" counts as off here: qvl.train.preflight.auto_levers resolves it before the run plans
          "host_embeddings": cfg.host_embeddings is True, "offload_activations": cfg.activation_offloading is True,
          # the encoder refuses a sample above model_max_length: none holds more visual tokens than that
          "visual_tokens_max": cfg.model_max_length}
    if cfg.lora_enable:
        kw.update(lora_r=cfg.lora_r, lora_targets=_lora_targets(cfg), lora_dropout=cfg.lora_dropout,
                  lora_experts=cfg.lora_experts and "llm" in cfg.lora_components)  # as components.expert_targets
    if cfg.quantization:  # the linears of quantization_targets quantised (the planner counts them; the rest bf16)
        kw.update(quantization=cfg.quantization, quantization_targets=tuple(cfg.quantization_targets))
    return kw


def train_fix(rec, cfg: TrainConfig) -> str | None:
    """A planner recommendation as `qvl train` keys; None when qvl's loop cannot apply it (ZeRO on one process)."""
    out, exact = [], True
    for key, value in rec.changes.items():
        if key == "batch":  # a divisor of the batch, so the samples per step stay the same
            bs = cfg.per_device_train_batch_size
            b = max(d for d in range(1, value + 1) if bs % d == 0)
            exact = b == value
            out += [f"per_device_train_batch_size={b}", f"gradient_accumulation_steps={cfg.gradient_accumulation_steps * bs // b}"]
        elif key == "seq_len":
            out.append(f"model_max_length={value}")
        elif key in ("gradient_checkpointing", "tune_mm_vision", "tune_mm_mlp"):
            out.append(f"{key}={str(bool(value)).lower()}")
        elif key == "max_pixels":
            out.append(f"{key}={value}")
        elif key == "lora_r":  # lora_alpha with it: the same alpha / r, the adapters' update scale
            out.append(f"lora_r={value}")
            if value != cfg.lora_r:
                out.append(f"lora_alpha={cfg.lora_alpha * value / cfg.lora_r:g}")
        elif key == "master_bf16" and value:
            out.append("master_weights=bf16")
        elif key == "optim" and value == "adamw8bit" and cfg.engine == "ddp":
            out.append("optim=adamw_8bit")
        elif key == "fused_ce" and value:
            out.append("fused_cross_entropy=true")
        elif key == "host_embeddings" and value:
            out.append("host_embeddings=true")
        elif key == "offload_activations" and value:
            out.append("activation_offloading=true")
        elif key == "quantization_targets" and (cfg.quantization or rec.changes.get("method") == "qlora"):
            out.append(f"quantization_targets=[{value}]")
        elif key == "method" and value == "lora":
            out += ["lora_enable=true", "tune_mm_llm=false"]
        elif key == "method" and value == "qlora":  # LoRA on a 4-bit LLM (qvl.train.quantize)
            out += ["lora_enable=true", "tune_mm_llm=false", "quantization=nf4"]
        else:
            return None
    if not out:
        return None
    return " ".join(out) + (f" (→ {rec.total_gib:.1f} GiB)" if rec.total_gib is not None and exact else "")


def plan_fits(cfg: TrainConfig, world_size: int = 1, records=(), gpu: str | None = None, row_tokens: int | None = None,
              **changes) -> bool | None:
    """Whether the planner says ``cfg`` (its plan keyword arguments changed by ``changes``) fits the card, at packed
    rows of ``row_tokens`` when given (as :func:`check`); None when there is no plan (no card known, unknown model
    shape, or the planner declines)."""
    from qvl.plan.preflight import preflight_train

    card = card_args(cfg.gpu_mem, gpu)
    if card["gpu"] is None and card["gpu_mem"] is None:
        from qvl.plan.gpus import detect_gpu

        if detect_gpu() is None:
            return None
    shape = model_for_plan(cfg.model_name_or_path)
    if shape is None:
        return None
    kw = _rows(cfg, plan_kwargs(cfg, world_size, has_video(records)), row_tokens)
    try:
        return preflight_train(shape, force=True, **card, **{**kw, **changes}).plan.fits
    except QvlError:
        return None


def shorter_rows(cfg: TrainConfig, world_size: int = 1, records=(), gpu: str | None = None,
                 row_tokens: int | None = None) -> int | None:
    """The longest packed-row budget below the run's rows that the plan fits, of the halvings down to
    ``model_max_length`` and ``model_max_length`` itself (a row still holds any one sample), or None. Rows of
    ``packed_row_tokens`` (auto on a mixture-of-experts model: 8,192 tokens) that do not fit a tight card may fit
    shorter; each row then reads the experts' weights for fewer tokens, so a step is slower. Each budget is planned
    as the run would pad its rows (``row_tokens`` comes padded for CUDA graphs:
    :func:`qvl.train.batches.longest_planned_row`)."""
    from qvl.data.packing import graph_row_length

    budget = cfg.row_budget()
    if not budget or not row_tokens:
        return None
    longest = min(budget, row_tokens)
    budgets = []
    fewer = longest // 2
    while fewer > cfg.model_max_length:
        budgets.append(fewer)
        fewer //= 2
    if cfg.model_max_length < longest:
        budgets.append(cfg.model_max_length)
    for fewer in budgets:
        planned = graph_row_length(fewer, cfg.cuda_graphs_row_multiple) if cfg.cuda_graphs is not False else fewer
        if plan_fits(cfg, world_size, records, gpu, planned):
            return fewer
    return None


def _rows(cfg: TrainConfig, kw: dict, row_tokens: int | None) -> dict:
    """Plan keyword arguments for packed rows of ``row_tokens`` (the longest the data makes, padded as CUDA graphs
    pad it) instead of ``batch x model_max_length``. No sample of such rows holds more visual tokens than the row
    (nor than ``model_max_length``, :func:`plan_kwargs`): the budget's worst case beyond it (16 frames of
    ``video_max_pixels`` / 16 for every clip) is not planned for; it used to make the planner decline, leaving video
    runs with no preflight and every layer recomputed."""
    if row_tokens and (cfg.data_flatten or cfg.data_packing):
        return {**kw, "batch": 1, "seq_len": row_tokens,
                "visual_tokens_max": min(row_tokens, kw.get("visual_tokens_max") or row_tokens)}
    return kw


# what `auto` may turn on when a run does not fit, in this order (the cheaper in step time first)
AUTO_LEVERS = (("host_embeddings", "host_embeddings"), ("activation_offloading", "offload_activations"))


# packed_row_tokens auto on a mixture-of-experts model: each packed row reads every expert's weights (a sample's
# tokens route to most of them) in forward, recompute and backward, so fewer, longer rows a step. 30B-A3B LoRA r=16
# on an H100, 16 samples a step: 5,024 tok/s in rows of up to 8,192 tokens against 398 one sample a row
# (2026-12-06, bench/results/train_moe_r16_packed_h100.json, train_moe_r16_h100.json)
MOE_ROW_TOKENS = 8192


def auto_row_budget(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """``cfg`` with ``packed_row_tokens: auto`` resolved, and the line that says what it chose (None when null):
    :data:`MOE_ROW_TOKENS`, or a micro-batch's whole row (batch x ``model_max_length``) if longer, so no row is cut
    shorter than it would be without, for a mixture-of-experts model trained on packed rows with more than one
    sample a step; null otherwise (dense models, padded batches, a shape not known before loading: a hub id not
    downloaded yet)."""
    if cfg.packed_row_tokens != "auto":
        return cfg, None
    packed = cfg.data_flatten or cfg.data_packing
    samples = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    shape = model_for_plan(cfg.model_name_or_path) if packed and samples > 1 else None
    if shape is None or not shape.is_moe:
        return cfg.model_copy(update={"packed_row_tokens": None}), None
    budget = max(MOE_ROW_TOKENS, cfg.per_device_train_batch_size * cfg.model_max_length)
    return cfg.model_copy(update={"packed_row_tokens": budget}), (
        f"packed_row_tokens auto: a step's samples in rows of up to {budget:,} tokens (a mixture-of-experts model: "
        "each row reads every expert's weights); packed_row_tokens=null keeps a row per micro-batch")


def auto_levers(cfg: TrainConfig, world_size: int = 1, records=(), gpu: str | None = None,
                row_tokens: int | None = None, applies: bool = True) -> tuple[TrainConfig, str | None]:
    """``cfg`` with its ``auto`` memory levers (``host_embeddings``, ``activation_offloading``) resolved to true or
    false, and a line saying what was turned on: each stays off unless the run does not fit the card without it
    and it is needed (with the ones before it) to fit. Off where they do not apply (``applies``: the packed-row path,
    :func:`qvl.train.loop.host_levers_refusal`; several processes; no gradient checkpointing, for offloading) and
    without a plan."""
    autos = [(key, plan_key) for key, plan_key in AUTO_LEVERS if getattr(cfg, key) == "auto"]
    cfg = cfg.model_copy(update={key: False for key, _ in autos})
    packed = cfg.data_flatten or cfg.data_packing
    if not autos or world_size > 1 or not packed or not applies:
        return cfg, None
    if plan_fits(cfg, world_size, records, gpu, row_tokens) is not False:
        return cfg, None
    shape = model_for_plan(cfg.model_name_or_path)
    table_stays = shape is None or shape.tied or (cfg.tune_mm_llm and not cfg.lora_enable)  # tied, or it trains
    tried = cfg
    for key, _ in autos:
        if key == "activation_offloading" and (not cfg.gradient_checkpointing or cfg.cuda_graphs is True):
            continue  # nothing recomputed to offload; or CUDA graphs asked for, which keep the inputs themselves
        if key == "host_embeddings" and table_stays:
            continue
        tried = tried.model_copy(update={key: True})
        if plan_fits(tried, world_size, records, gpu, row_tokens):
            on = [k for k, _ in AUTO_LEVERS if getattr(tried, k) is True and getattr(cfg, k) is not True]
            return tried, (f"{' and '.join(f'{k}=true' for k in on)} (auto): without, the memory plan does not fit "
                           "this run on the card")
    return cfg, None  # nothing fits: the preflight says so, with the planner's fixes


def check(cfg: TrainConfig, *, world_size: int = 1, records=(), say=print, gpu: str | None = None,
          row_tokens: int | None = None, rows_from: str = "the longest this data makes"):
    """Run the preflight: print its one line; raise QvlError (numbers + fix) when it will not fit, unless ``force``.

    ``row_tokens``: packed rows, the longest the run's data makes (:func:`qvl.train.batches.longest_planned_row`):
    planned for instead of ``batch x model_max_length``, which the data may never reach (a 24 GB card refused an
    8B LoRA run of ~1.8k-token samples because two 4,096-token samples would not have fitted).
    Returns the :class:`qvl.plan.Preflight`, or None when skipped (no CUDA and no gpu_mem, unknown model shape).
    """
    from qvl.plan.preflight import Preflight, preflight_train

    card = card_args(cfg.gpu_mem, gpu)
    if card["gpu"] is None and card["gpu_mem"] is None:
        from qvl.plan.gpus import detect_gpu

        if detect_gpu() is None:
            say("memory preflight skipped: no CUDA device")
            return None
    shape = model_for_plan(cfg.model_name_or_path)
    if shape is None:
        say(f"memory preflight skipped: the planner does not know the shape of {cfg.model_name_or_path}")
        return None
    kw = _rows(cfg, plan_kwargs(cfg, world_size, has_video(records)), row_tokens)
    try:
        pf = preflight_train(shape, force=True, **card, **kw)
    except QvlError as e:  # e.g. more visual tokens per sample than model_max_length: the encoder reports those
        say(f"memory preflight skipped: {e.what}")
        return None
    plan = pf.plan
    rows = f" (packed rows up to {row_tokens:,} tokens, {rows_from})" if kw["batch"] == 1 and \
        row_tokens == kw["seq_len"] else ""
    if plan.fits:
        say(pf.message + rows)
        return pf
    fixes = [f for f in (train_fix(r, cfg) for r in plan.recommendations if r.fits) if f]
    if kw["recompute_keeps_attention"] and plan_fits(cfg, world_size, records, gpu, row_tokens,
                                                     recompute_keeps_attention=False):
        fixes.insert(0, "gradient_checkpointing_scope=layer")
    shorter = shorter_rows(cfg, world_size, records, gpu, row_tokens)
    if shorter:  # the same model, samples and adapters: it costs speed only
        fixes.insert(0, f"packed_row_tokens={shorter}")
    what = f"{plan.verdict}{rows}" + (f"; try {fixes[0]}" if fixes else "")
    if cfg.force:
        say(f"memory preflight: {what} (force=true: trying anyway)")
        return Preflight(True, f"memory preflight: {what} (force=true: trying anyway)", plan, {})
    say(f"memory preflight: {what}")
    fix = (f"set {fixes[0]}" if fixes else "use a larger GPU or a smaller model (`qvl plan train` lists options)")
    raise QvlError(what, where="memory preflight", fix=fix + "; or pass --force (force=true) to try anyway")


# `gradient_checkpointing_ratio: auto` keeps the predicted peak under this share of the card: the planner's
# kept activations per layer measured 1.5-1.8x above the real ones (8B LoRA, docs/benchmarks.md), so this
# leaves room for the allocator and for what the planner does not see.
AUTO_CHECKPOINT_BUDGET = 0.9


def auto_checkpoint_ratio(cfg: TrainConfig, pf, world_size: int = 1, records=(), row_tokens: int | None = None,
                          compiled: bool = False) -> tuple[float, float | None, str]:
    """(ratio, activation_memory_budget, why) for ``gradient_checkpointing_ratio: auto``: the fewest recomputed
    decoder layers whose kept activations, at rows of ``row_tokens`` (the longest row the run's plan makes; default
    the longest a micro-batch can make), fit what the all-recomputed plan leaves free.

    ``compiled`` (whole layers compiled, the compiler choosing what a kept layer keeps): the budget is the loosest of
    :data:`qvl.plan.memory.COMPILED_BUDGETS` at which every layer is kept, else 0.8 (a kept layer then costs the
    least for what it saves: ``bench/experiments/layer_memory.py``) with the fewest layers recomputed whole; with LoRA
    dropout only the compiler's own partition (:data:`qvl.train.config.DROPOUT_UNDER_BUDGET`). Otherwise the
    budget is None and a kept layer costs the planner's eager estimate."""
    from qvl.plan.memory import (COMPILED_BUDGETS, attention_saved_bytes_per_token,
                                 compiled_layer_saved_bytes_per_token, layer_saved_bytes_per_token, llm_lora_targets,
                                 parse_lora_targets)
    from qvl.train.recompute import ratio_for_memory

    plan = getattr(pf, "plan", None)
    shape = model_for_plan(cfg.model_name_or_path) if plan is not None else None
    if plan is None or shape is None or not plan.fits:
        return 1.0, None, "every layer recomputed (no memory plan for this card)"
    kw = plan_kwargs(cfg, world_size, has_video(records))
    targets = llm_lora_targets(parse_lora_targets(kw["lora_targets"])) if cfg.lora_enable else ()
    row_tokens = min(row_tokens or cfg.longest_row(), cfg.longest_row())
    free = (AUTO_CHECKPOINT_BUDGET * plan.gpu_total_gib - plan.total_gib) * 2**30
    budget = None
    if compiled:
        r = cfg.lora_r if cfg.lora_enable else 0
        mlp_trains = not cfg.lora_enable or any(t in ("gate", "up", "down") for t in targets)
        for budget in ((None,) if dropout_in_layers(cfg) else COMPILED_BUDGETS):  # DROPOUT_UNDER_BUDGET
            layer = compiled_layer_saved_bytes_per_token(shape, budget, r, len(targets), mlp_trains,
                                                         targets if dropout_in_layers(cfg) else ()) * row_tokens
            if shape.layers * layer <= free:
                break
    else:
        per_token = layer_saved_bytes_per_token(shape, cfg.lora_r if cfg.lora_enable else 0, targets,
                                                cfg.lora_dropout if cfg.lora_enable else 0.0,
                                                expert_lora=bool(kw.get("lora_experts")))
        if kw["recompute_keeps_attention"]:  # the plan counts every layer's attention half already
            per_token -= attention_saved_bytes_per_token(shape)
        layer = per_token * row_tokens
    ratio = ratio_for_memory(shape.layers, free, layer)
    kept = shape.layers - round(ratio * shape.layers)
    if not kept:
        # the budget governs what a kept layer saves; with every layer recomputed whole it only risks the
        # partitioner: inductor failed on the 8B layer at 0.8 with recompute inside (2026-12-05, H200 emulating a
        # 24 GB card, bench/results/train_cli_24gb.json) and the layers ran eagerly
        budget = None
    how = "" if not compiled or not kept else (" (the compiler's own partition)" if budget is None
                                               else f" (activation_memory_budget {budget:g})")
    return ratio, budget, (f"{shape.layers - kept} of {shape.layers} layers recomputed: {kept} kept{how} at "
                           f"{layer / 2**30:.2f} GiB each (rows up to {row_tokens:,} tokens) within "
                           f"{AUTO_CHECKPOINT_BUDGET:.0%} of {plan.gpu_total_gib:.1f} GiB")


def dry_run(cfg: TrainConfig, say=print, gpu: str | None = None):
    """`qvl train CONFIG --dry-run`'s memory part: what the run would plan on its card (``gpu_mem`` /
    ``$QVL_GPU`` / ``$QVL_GPU_MEM``, else the GPU here) without reading the data or loading anything: rows of the
    longest a micro-batch can make, the ``auto`` host-memory levers resolved as the run would resolve them on a GPU,
    and the preflight's line. Returns the :class:`qvl.plan.Preflight` (None when there is no card or no known model
    shape; the reason is said)."""
    import torch

    from qvl.train.loop import host_levers_refusal

    cfg, rows_line = auto_row_budget(cfg)
    if rows_line:
        say(rows_line)
    row_tokens = cfg.longest_row()
    cuda = torch.device("cuda")  # the levers as the run would choose them there, also from a CPU machine
    cfg, line = auto_levers(cfg, row_tokens=row_tokens, gpu=gpu, applies=not host_levers_refusal(cfg, cuda))
    if line:
        say(line)
    try:
        return check(cfg.model_copy(update={"force": True}), say=say, gpu=gpu, row_tokens=row_tokens,
                     rows_from="the longest a micro-batch can make: the data is not read")
    except QvlError as e:  # not expected with force; said rather than raised: a dry run reports
        say(f"memory preflight: {e.what}")
        return None
