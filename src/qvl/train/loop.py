"""The training loop: a plain PyTorch recipe, top to bottom.

    setup (ranks, device) -> data (records, seeded order) -> model (load, freeze / LoRA, dtype)
    -> optimizer (per-component LR groups) + schedule -> resume -> for each step:
         fetch the step's micro-batches -> count label tokens (all ranks) ->
         forward + token-weighted loss (+ 0 x vision tower on text-only batches) -> backward
       -> clip -> optimizer / scheduler step -> log -> checkpoint
    -> final servable folder

:func:`_train` runs these as one function per stage, in this order: :func:`_setup_run`, :func:`_setup_data`,
:func:`_prepare_output_dir`, :func:`_plan_recompute`, :func:`_setup_model`, :func:`_setup_fast_path` (compiled
layers, CUDA graphs), :func:`_setup_loss_module` (loss head, matmul row counts, host embeddings),
:func:`_setup_engine`, :func:`_resume`, :func:`_warm_up`, :func:`_run_steps`, :func:`_save_final`; a :class:`Run`
carries what one stage hands to the next.

Loss under gradient accumulation is the sum of per-token losses over every micro-batch of the
step (and every rank) divided by the number of label tokens in all of them, so a step's loss does
not depend on how its samples were split into micro-batches.

What each step reads (seeded order, rank shares, micro-batches, packed rows) comes from :mod:`qvl.train.batches`:
resuming from a checkpoint at step S replays exactly the batches an uninterrupted run would have seen after S.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qvl.data.preprocess import IGNORE_INDEX
from qvl.errors import QvlError
from qvl.train import checkpoint as ckpt
from qvl.train import components as comp
from qvl.train import batches, compile, distributed, graphs, host, loss_head, offload, optimizers, recompute
from qvl.train.track import WarmUpEvents, first_step_line
from qvl.train.loss_module import LossModule
from qvl.train.config import TrainConfig, dropout_in_layers
from qvl.train.profile import StepProfiler, parse_steps
from qvl.train.step_watch import StepWatch


# --------------------------------------------------------------------------------------------------
# Processes and devices
# --------------------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def all_sum(self, value: float, device) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item())


def setup_dist() -> Dist:
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    if d.enabled and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(d.local_rank)
        torch.distributed.init_process_group(backend)
    return d


def pick_device(dist: Dist) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Steps: out of memory, warm-up, attention and worker choices (the data they read: qvl.train.batches)
# --------------------------------------------------------------------------------------------------

def out_of_memory(e: Exception, cfg: TrainConfig, graphs: bool, ckpt_ratio) -> QvlError:
    """The GPU ran out of memory: what to change, most effective first (the preflight predicted a fit, or was
    forced)."""
    fixes = []
    if graphs:
        fixes.append("cuda_graphs=false (the graphs keep their own memory pool)")
    if cfg.gradient_checkpointing and ckpt_ratio != 1.0:
        fixes.append("gradient_checkpointing_ratio=1.0 (every layer recomputed)")
    elif not cfg.gradient_checkpointing:
        fixes.append("gradient_checkpointing=true")
    fixes.append("a lower model_max_length / per_device_train_batch_size, or smaller max_pixels / video_max_pixels")
    return QvlError(f"the GPU ran out of memory while training ({str(e).splitlines()[0][:200]})",
                    where="training step", fix="; or ".join(fixes) + " (`qvl plan train` shows the memory plan)")


GRAPH_STEPS_AHEAD = 500  # cuda_graphs: steps whose row shapes are recorded before training


# Rows up to this many tokens use sdpa's dense block-diagonal mask (16k x 16k booleans = 256 MiB, made
# once per forward). Measured on an H100 (8B LoRA, ~2.7k-token rows, 30 steps): sdpa 1,820 tok/s vs flex
# 752 tok/s in the training loop, where flex pays compilation for every new row shape (docs/benchmarks.md).
DENSE_MASK_MAX_TOKENS = 16_384


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader worker processes: as asked, else 4 on a GPU machine with >= 6 cores, else 0."""
    if requested is not None:
        return requested
    cores = os.cpu_count() or 1
    return min(4, cores - 2) if device.type == "cuda" and cores >= 6 else 0


def compiles_whole_layers(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the decoder layers will compile whole (``compile_layers`` on, ``compile_scope: layer``), told before the
    model loads from what the config and the model's shape say (:func:`qvl.train.compile.compile_choice`)."""
    from qvl.data.packing import PER_SAMPLE_ATTENTION, varlen_available
    from qvl.plan.preflight import model_for_plan

    shape = model_for_plan(cfg.model_name_or_path)
    moe = shape is None or shape.is_moe  # unknown: the cautious answer
    packed = cfg.data_flatten or cfg.data_packing
    per_sample = packed and packed_attention_for(cfg.packed_attention, device, cfg.longest_row()) in (
        "per_sample", PER_SAMPLE_ATTENTION)
    compiling, _ = compile.compile_choice(cfg.compile_layers, device, cfg.engine, per_sample, moe,
                                          varlen=varlen_available() and cfg.bf16, quantized=bool(cfg.quantization))
    return compiling and cfg.compile_scope == "layer"


HOST_LEVERS_FIX = "data_flatten: true, packed_attention: per_sample (auto on a GPU with torch >= 2.10), one GPU or DDP"


def host_levers_refusal(cfg: TrainConfig, device: torch.device) -> str:
    """Why ``host_embeddings`` / ``activation_offloading`` cannot apply to ``cfg`` on ``device`` ('' when they can):
    both work on the packed-row path (per_sample attention, qvl's row forward: one GPU or DDP)."""
    from qvl.data.packing import PER_SAMPLE_ATTENTION

    packed = cfg.data_flatten or cfg.data_packing
    if not packed or packed_attention_for(cfg.packed_attention, device, cfg.longest_row()) not in (
            "per_sample", PER_SAMPLE_ATTENTION):
        return "it needs packed rows with per_sample attention"
    if cfg.engine != "ddp":
        return f"it runs on one GPU or under DDP, not under {cfg.engine}"
    return ""


def packed_attention_for(choice: str, device: torch.device, max_row_tokens: int | None = None) -> str:
    """The attention for packed rows.

    ``auto``: sdpa on CPU; on CUDA ``per_sample`` (one flash-attention varlen call per layer, torch >= 2.10:
    4,549 vs 3,260 tok/s for sdpa's dense block-diagonal mask, 8B LoRA on an H100, docs/benchmarks.md), the one
    the fast path (row forward, compiled layers, CUDA graphs, activation offloading) is built on; with an older
    torch, flash_attention_2 if flash-attn is importable, else sdpa while rows stay within DENSE_MASK_MAX_TOKENS
    and flex beyond. (flash-attn installed used to win over per_sample, turning the fast path off for everyone who
    installs it, as the official recipe asks.)
    """
    import importlib.util

    from qvl.data.packing import varlen_available

    has_fa = importlib.util.find_spec("flash_attn") is not None
    if choice == "auto":
        if device.type != "cuda":
            return "sdpa"
        if varlen_available():
            return "per_sample"
        if has_fa:
            return "flash_attention_2"
        return "sdpa" if max_row_tokens is not None and max_row_tokens <= DENSE_MASK_MAX_TOKENS else "flex"
    if choice == "flash_attention_2" and not has_fa:
        raise QvlError("packed_attention=flash_attention_2 but flash-attn is not installed", where="packed_attention",
                       fix="pip install flash-attn, or packed_attention: auto (flex on GPU, sdpa on CPU)")
    if choice == "flash_attention_2" and device.type != "cuda":
        raise QvlError("flash_attention_2 needs a GPU", where="packed_attention", fix="packed_attention: sdpa on CPU")
    if choice == "flex" and device.type != "cuda":
        raise QvlError("flex attention's backward pass runs on GPUs only", where="packed_attention",
                       fix="packed_attention: sdpa (or auto) on CPU")
    return choice


# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    start_step: int
    losses: list[float] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    peak_mem_gib: float = 0.0
    final_files: list[str] = field(default_factory=list)
    resumed_from: str | None = None


def _load_data(cfg: TrainConfig):
    from qvl.data.registry import load_mixture, load_registry, registry_path

    path = registry_path(cfg.dataset_registry)
    if cfg.dataset_registry and not path.is_file():
        raise QvlError(f"dataset registry {path} not found", where="dataset_registry")
    registry = load_registry(path) if path.is_file() else None
    return load_mixture(cfg.dataset_use, registry, seed=cfg.seed)


def train(cfg: TrainConfig, log=print, callbacks=()) -> TrainResult:
    """Train as ``cfg`` says. ``callbacks`` are called as ``cb(step, row)`` after each step (tests use them)."""
    import torch._dynamo

    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    # set for the run only: compile_layers (suppress_errors, specialize_float, fallback_random), activation_memory_budget
    dynamo = torch._dynamo.config
    kept = (dynamo.suppress_errors, dynamo.specialize_float, functorch_config.activation_memory_budget,
            inductor_config.fallback_random)
    try:
        return _train(cfg, log, callbacks)
    finally:
        (dynamo.suppress_errors, dynamo.specialize_float, functorch_config.activation_memory_budget,
         inductor_config.fallback_random) = kept


@dataclass
class Run:
    """What the stages of one run hand on to the next (each stage below fills its part, top to bottom)."""
    # _setup_run
    cfg: TrainConfig
    say: object
    dist: Dist
    device: torch.device
    is_main: bool
    out: Path
    t_start: float
    card_gib: float | None = None
    # _setup_data
    records: object = None
    processor: object = None
    pad_id: int = 0
    encoder: batches.Encoder | None = None
    plan: batches.Plan | None = None
    longest_row: int | None = None
    memory_plan: object = None
    auto_on: set = field(default_factory=set)  # memory levers `auto` turned on (qvl.train.preflight.auto_levers)
    # _prepare_output_dir
    resume_from: Path | None = None
    # _plan_recompute
    ckpt_ratio: object = None
    memory_budget: float | None = None
    # _setup_model
    load_dtype: torch.dtype = torch.float32
    t_load: float = 0.0
    model: object = None
    trainable: list = field(default_factory=list)
    fp32_masters: bool = False
    packed: bool = False
    attn: str | None = None
    rope_index: object = None
    per_sample: bool = False
    # _setup_fast_path
    compiling: bool = False
    use_graphs: bool = False
    row_multiple: int = 0
    compile_failures: compile.CompileFailures | None = None  # what runs eagerly after all (compile_layers auto)
    tower_compile: object = None  # the vision tower compiling in a thread after the first step (CompileInBackground)
    # _setup_loss_module
    loss_module: LossModule | None = None
    gemm_multiple: int = 0
    media_multiple: int = 0
    host_table: torch.Tensor | None = None
    # _setup_engine
    eng: object = None
    optimizer: object = None
    scheduler: object = None
    decoder_graphs: object = None
    main_group: str = ""
    # _resume
    start_step: int = 0
    tracker: object = None
    # _warm_up
    autocast: object = None
    t_warm: float = 0.0
    # _run_steps
    losses: list[float] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    row: dict = field(default_factory=dict)
    last_queued: tuple | None = None  # the last reported step's queued read: its end on the GPU's clock
    last_queued_at: float = 0.0  # and when the host had queued it (the CPU's step end)
    profiler: object = None  # profile_steps (qvl.train.profile.StepProfiler), rank 0


def _train(cfg: TrainConfig, log, callbacks) -> TrainResult:
    run = _setup_run(cfg, log)
    _setup_data(run)
    _prepare_output_dir(run)
    _plan_recompute(run)
    _setup_model(run)
    _setup_fast_path(run)
    _setup_loss_module(run)
    try:
        _setup_engine(run)
        _resume(run)
        _warm_up(run)
        _run_steps(run, callbacks)
    finally:
        _put_back(run)
    return _save_final(run)


def _put_back(run: Run) -> None:
    """The host-memory levers undone, also when the run fails (benchmarks and tests train the model object again):
    the embedding table back on the device, no offload hooks on the decoder stack."""
    from qvl.data.packing import language_model

    if run.host_table is not None:
        host.embeddings_to_device(run.model, run.device)
    offload.remove(language_model(run.model))
    if run.compile_failures is not None:
        run.compile_failures.detach()


def _setup_run(cfg: TrainConfig, log) -> Run:
    """Ranks, device, engine, and the memory cap: nothing is allocated on the GPU before the cap."""
    t_start = time.perf_counter()
    if cfg.deepspeed:
        from qvl.train.config import deepspeed_config

        deepspeed_config(cfg)  # refuse a JSON with its own optimizer / scheduler before anything else
    dist = setup_dist()
    device = pick_device(dist)
    is_main = dist.rank == 0
    say = log if is_main else (lambda *a, **k: None)
    cfg, engine_note = distributed.engine_for_ranks(cfg, dist.world_size)
    if engine_note:
        say(engine_note)
    from qvl.train.preflight import auto_row_budget

    cfg, rows_note = auto_row_budget(cfg)  # before any row is planned
    if rows_note:
        say(rows_note)
    if cfg.quantization:  # engines that cannot hold quantised weights, or no bitsandbytes: refused before any load
        from qvl.train.preflight import zero_settings
        from qvl.train.quantize import engine_problem, require_bitsandbytes

        problem = engine_problem(cfg, zero_settings(cfg)[0])
        if problem:
            raise problem
        require_bitsandbytes(cfg.quantization, device, torch.bfloat16 if cfg.bf16 else torch.float32)
    if optimizers.is_8bit(cfg.optim):  # likewise 8-bit optimizer states: refused before any load
        problem = optimizers.engine_problem(cfg)
        if problem:
            raise problem
        optimizers.require_bitsandbytes(cfg.optim, device)
    if cfg.engine != "ddp":  # DeepSpeed and FSDP2 need a process group, also for one process
        distributed.init_group(device)
    from qvl.train.preflight import cap_memory

    card_gib, cap_note = cap_memory(cfg, device)  # before anything is allocated on the GPU
    if cap_note:
        say(cap_note)
    out = Path(cfg.output_dir)
    return Run(cfg=cfg, say=say, dist=dist, device=device, is_main=is_main, out=out, t_start=t_start,
               card_gib=card_gib)


def _setup_data(run: Run) -> None:
    """Data records and their order, then the memory preflight for the rows they make: stop before anything loads
    (or moves) if it cannot fit."""
    from qvl.models.load import load_processor
    from qvl.models.tokens import token_ids

    cfg, dist, say = run.cfg, run.dist, run.say
    records = _load_data(cfg)
    processor = load_processor(cfg.model_name_or_path)  # saved untouched: inference budgets stay the model's
    pad_id = token_ids(processor.tokenizer).pad
    encoder = batches.Encoder(records, processor, cfg)
    from qvl.data.lengths import TokenEstimate

    plan = batches.Plan(len(records), cfg, dist, lengths=TokenEstimate(records, processor, encoder.budget))
    longest_row = batches.longest_planned_row(plan, cfg)
    from qvl.train.preflight import auto_levers
    from qvl.train.preflight import check as preflight

    if cfg.gradient_checkpointing_scope == "auto":  # resolved before the preflight: the plan counts what it keeps
        cfg = cfg.model_copy(update={"gradient_checkpointing_scope": "layer"})
    asked = cfg
    why_not = host_levers_refusal(cfg, run.device)  # the host-memory levers need the packed-row path
    for key in ("host_embeddings", "activation_offloading"):
        if getattr(cfg, key) is True and why_not:  # asked for: refused before anything loads
            raise QvlError(f"{key}: {why_not}", where=key, fix=f"{HOST_LEVERS_FIX}, or {key}: false")
    if cfg.activation_offloading is True and not cfg.gradient_checkpointing:
        raise QvlError("activation_offloading: it moves what recomputed layers keep, and gradient_checkpointing is "
                       "off", where="activation_offloading",
                       fix="gradient_checkpointing: true, or activation_offloading: false")
    cfg, levers = auto_levers(cfg, world_size=dist.world_size, records=records, row_tokens=longest_row,
                              applies=not why_not)
    if levers:
        say(levers)
    run.auto_on = {key for key in ("host_embeddings", "activation_offloading")
                   if getattr(asked, key) == "auto" and getattr(cfg, key) is True}
    memory_plan = preflight(cfg, world_size=dist.world_size, records=records, say=say, row_tokens=longest_row)
    run.cfg, run.records, run.processor, run.pad_id, run.encoder = cfg, records, processor, pad_id, encoder
    run.plan, run.longest_row, run.memory_plan = plan, longest_row, memory_plan


def _prepare_output_dir(run: Run) -> None:
    """Run folder: resume, or start fresh (moving old files aside; nothing is deleted); seeds."""
    cfg, dist, say, is_main, out = run.cfg, run.dist, run.say, run.is_main, run.out
    resume_from = None
    if cfg.resume is True:
        resume_from = ckpt.latest_checkpoint(out)
    elif isinstance(cfg.resume, str) and cfg.resume.lower() not in ("false", "no"):
        resume_from = Path(cfg.resume)
        if not resume_from.is_dir():
            raise QvlError(f"checkpoint {resume_from} not found", where="resume")
    # a fresh start never writes over an earlier run (e.g. one with save_strategy=no): its files move aside
    if resume_from is None and is_main and (cfg.resume is not True or ckpt.holds_run(out)):
        moved = ckpt.archive_run(out)
        if moved:
            why = "resume=false" if cfg.resume is not True else "no complete checkpoint to resume from"
            say(f"{why}: the previous run's files were moved to {moved}")
    if dist.enabled:
        torch.distributed.barrier()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    import random

    import numpy as np
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    run.resume_from = resume_from


def _plan_recompute(run: Run) -> None:
    """Recompute: as little as the card allows for the rows the data makes."""
    cfg, say = run.cfg, run.say
    ckpt_ratio, memory_budget = cfg.gradient_checkpointing_ratio, cfg.activation_memory_budget
    if cfg.gradient_checkpointing and ckpt_ratio == "auto":
        from qvl.train.preflight import auto_checkpoint_ratio

        def plan(compiled: bool):
            return auto_checkpoint_ratio(cfg, run.memory_plan, run.dist.world_size, run.records,
                                         row_tokens=run.longest_row, compiled=compiled)

        whole = (memory_budget == "auto" and cfg.gradient_checkpointing_scope == "layer"
                 and compiles_whole_layers(cfg, run.device))
        ckpt_ratio, auto_budget, why = plan(whole)
        memory_budget = auto_budget if memory_budget == "auto" else memory_budget
        say(f"gradient checkpointing (gradient_checkpointing_ratio auto): {why}")
    memory_budget = None if memory_budget == "auto" else memory_budget
    run.ckpt_ratio, run.memory_budget = ckpt_ratio, memory_budget


def _setup_model(run: Run) -> None:
    """Model: dtype, what trains, memory savers, packed rows' attention."""
    from qvl.data.packing import PER_SAMPLE_ATTENTION
    from qvl.models.attention import use_vision_sdpa
    from qvl.models.load import load_model

    cfg, say, device, ckpt_ratio = run.cfg, run.say, run.device, run.ckpt_ratio
    load_dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    t_load = time.perf_counter()
    model = load_model(cfg.model_name_or_path, dtype=load_dtype, attn_implementation=cfg.attn_implementation)
    t_load = time.perf_counter() - t_load
    use_vision_sdpa(model)  # load_model does it too; said here because the step's host time depends on it
    if cfg.quantization:  # the chosen linears quantised onto the device one by one, before LoRA wraps them
        from qvl.train.quantize import quantize_model

        say(quantize_model(model, cfg, device, load_dtype).line(load_dtype))
    model = comp.apply_training_mode(model, cfg)
    from qvl.models import moe_experts

    if n_moe := moe_experts.install(model):  # after peft: its expert adapters join the grouped GEMMs low-rank
        say(f"MoE experts: grouped GEMMs over tokens sorted by expert in {n_moe} layers"
            + (", their LoRA kept low-rank" if moe_experts.has_expert_lora(model) else ""))
        if (cfg.data_flatten or cfg.data_packing) and not cfg.row_budget() and cfg.gradient_accumulation_steps > 1:
            # every row reads all the experts' weights (a sample's tokens route to most of them) and runs the eager
            # layers' host work: 30B-A3B, 16 one-sample rows a step, 15.5 s a step on an H100 (2026-12-06,
            # bench/results/train_moe_r16_h100.json)
            from qvl.train.preflight import MOE_ROW_TOKENS

            say(f"packed_row_tokens=null: each of a step's {cfg.gradient_accumulation_steps} micro-batches is a row "
                "of its own, and each row reads every expert's weights (forward, recompute, backward); "
                f"packed_row_tokens={MOE_ROW_TOKENS} regroups a step's samples into fewer, longer rows (the same "
                "loss; auto does so where the model's config.json can be read before loading)")
    if cfg.gradient_checkpointing:
        comp.enable_gradient_checkpointing(model)
        if ckpt_ratio != "auto" and ckpt_ratio < 1.0:  # selective: only some decoder layers recompute
            recompute.checkpoint_some_layers(model, ckpt_ratio)
        if cfg.gradient_checkpointing_scope != "layer":
            if cfg.engine != "ddp":  # the recompute runs without the engine's gather hooks (not tested there)
                raise QvlError(f"gradient_checkpointing_scope={cfg.gradient_checkpointing_scope} runs on one GPU or "
                               f"under DDP, not under {cfg.engine}", where="gradient_checkpointing_scope",
                               fix="gradient_checkpointing_scope: layer")
            n = recompute.recompute_scope(model, cfg.gradient_checkpointing_scope,
                                          cfg.lora_r if cfg.lora_enable else None)
            say(f"gradient_checkpointing_scope={cfg.gradient_checkpointing_scope}: {n} recomputed layers keep "
                "their attention half and recompute the MLP; gradient_checkpointing_scope=layer recomputes them whole")
    trainable = [p for p in model.parameters() if p.requires_grad]
    fp32_masters = load_dtype != torch.float32 and distributed.master_weights_fp32(cfg)
    if load_dtype != torch.float32 and not fp32_masters and not cfg.lora_enable and cfg.engine != "deepspeed":
        say("note: full fine-tuning with bf16 weights and AdamW states (as the Hugging Face Trainer): updates "
            "smaller than bf16's resolution (~0.4 % of a weight) are lost; master_weights=fp32 keeps fp32 copies")
    if fp32_masters:
        for p in trainable:  # adapters / FSDP shards keep fp32 master weights; the frozen base stays bf16
            p.data = p.data.float()
    elif cfg.lora_enable and load_dtype != torch.float32 and cfg.master_weights == "bf16" and cfg.engine == "ddp":
        for p in trainable:  # peft made the adapters fp32 (autocast_adapter_dtype): back to the model's dtype
            p.data = p.data.to(load_dtype)
        say("master_weights=bf16: LoRA adapters, their gradients and optimizer states in bf16 "
            "(8 bytes per adapter parameter with AdamW, 6 with optim=adamw_8bit, instead of 16); updates below bf16's "
            "resolution (~0.4 % of a weight) are lost")
    if cfg.lora_enable and cfg.bf16:  # autocast rounds LoRA inputs to bf16 anyway: no fp32 copy on the way
        comp.lora_inputs_stay_16bit(model)
    model.to(device)
    model.train()
    packed = cfg.data_flatten or cfg.data_packing
    attn = rope_index = None
    if packed:  # one row per micro-batch: each sample attends only to itself, with its own mRoPE positions
        from qvl.data.packing import RopeIndex, rope_index_fn, use_packed_attention

        attn = use_packed_attention(model, packed_attention_for(cfg.packed_attention, device, cfg.longest_row()))
        rope_index = rope_index_fn(model)
        run.encoder.rope_index = RopeIndex(model)  # positions computed where samples are encoded (workers)
    else:
        say("data_flatten=false: padded batches, which compute the padding and turn off the fast path (packed rows, "
            "compiled layers, CUDA graphs): 3.9x slower for 8B LoRA on an H200 (lora_8b_24gb.yaml, 2026-12-04: 3.05 s "
            "a step against 0.79 s packed); "
            "data_flatten=true (the default) gives the same loss")
    run.load_dtype, run.t_load, run.model = load_dtype, t_load, model
    run.trainable, run.fp32_masters = trainable, fp32_masters
    run.packed, run.attn, run.rope_index = packed, attn, rope_index
    run.per_sample = packed and attn == PER_SAMPLE_ATTENTION


def _setup_fast_path(run: Run) -> None:
    """Compiled layers (and vision tower) and CUDA graphs: whether, and compiling now."""
    from qvl.data.packing import varlen_available

    cfg, say, device, model, per_sample = run.cfg, run.say, run.device, run.model, run.per_sample
    compiling, why = compile.compile_choice(cfg.compile_layers, device, cfg.engine, per_sample,
                                            getattr(model.config.get_text_config(), "num_experts", 0) > 0,
                                            varlen=varlen_available() and cfg.bf16, quantized=bool(cfg.quantization))
    upstream = any(p.requires_grad and (".visual." in n or "embed_tokens" in n) for n, p in model.named_parameters())
    from qvl.train.quantize import fast_path_note

    graphs_wanted, quant_note = fast_path_note(cfg, compiling)  # quantised: cuda_graphs auto off (not measured)
    if quant_note and device.type == "cuda":
        say(quant_note)
    if cfg.activation_offloading is True and graphs_wanted is not False:  # a recording keeps its inputs on the GPU
        if graphs_wanted is True:
            raise QvlError("activation_offloading=true and cuda_graphs=true do not go together: a recorded decoder "
                           "stack keeps the layers' inputs in its own GPU pool", where="activation_offloading",
                           fix="cuda_graphs: false (or auto), or activation_offloading: false")
        graphs_wanted = False
        if device.type == "cuda":
            say("cuda_graphs auto: off (activation_offloading moves the layers' inputs to the host, which a recorded "
                "decoder stack cannot)")
    total_gib = run.card_gib or (torch.cuda.get_device_properties(device).total_memory / 2**30
                                 if device.type == "cuda" else None)
    use_graphs, graphs_why = graphs.cuda_graphs_choice(
        graphs_wanted, device, run.dist.world_size, per_sample, varlen=varlen_available() and cfg.bf16,
        compiled=compiling, lora=cfg.lora_enable, upstream_trains=upstream, total_gib=total_gib,
        row_tokens=run.longest_row)
    row_multiple = cfg.cuda_graphs_row_multiple if use_graphs else 0
    memory_budget = run.memory_budget
    if compiling:  # per-sample attention gets its sample bounds as inputs: whole modules compile
        n = compile.compile_layers(model, eager_fallback=cfg.compile_layers == "auto", scope=cfg.compile_scope)
        # whole layers whose backward the compiler plans with a recompute in it: checkpointed ones, or any under
        # an activation memory budget
        recomputing = (any(offload.recomputes(layer) for layer in recompute.decoder_layers(model))
                       or (memory_budget is not None and memory_budget < 1))
        random_line = compile.eager_random_ops(device, dropout_in_layers(cfg),
                                               recompute_inside=cfg.compile_scope == "layer" and recomputing)
        if random_line:
            say(random_line)
        run.compile_failures = compile.CompileFailures().attach() if cfg.compile_layers == "auto" else None
        what = ("whole decoder layers, recompute inside" if cfg.compile_scope == "layer"
                else "each layer's norms, attention and MLP")
        from qvl.train import row_forward

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # on a GPU with shapes met as they come, the tower compiles in a thread after the first step (which
        # compiles the decoder layers): the steps need not wait for it (qvl.train.background_compile). Not on
        # small cards: the compile's first run of the tower (and inductor's tuning buffers) come on top of a step
        from qvl.train.background_compile import supported

        background = (device.type == "cuda" and cfg.warmup_shapes == "lazy" and supported()
                      and (total_gib or 0) >= graphs.GRAPHS_AUTO_MIN_GIB)
        if (per_sample and cfg.engine == "ddp" and row_forward.usable(base.model, base.config)
                and compile.compile_vision_tower(model, background=background)):
            run.tower_compile = compile.tower_in_background(model)
            tower = (", and the frozen vision tower's forward (one graph" +  # it gets its inputs precomputed
                     ("; compiled in the background once the first step is done, the steps running it uncompiled "
                      "until then" if background else "") + ")")
        else:
            blocks = compile.compile_vision_blocks(model)  # frozen tower only
            tower = f", and the frozen vision tower's {blocks} blocks" if blocks else ""
        say(f"compile_layers ({why}): {n} modules compiled ({what}; one graph for all layers){tower}; the first "
            "steps compile (~1 min on an H100); compile_layers=false turns it off")
        if memory_budget is not None:
            import torch._functorch.config as functorch_config

            functorch_config.activation_memory_budget = memory_budget
            say(f"activation_memory_budget={memory_budget:g}: the compiled layers keep that share of their "
                "activations for backward, recomputing the cheapest work per byte")
    elif why:
        say(f"compile_layers off: {why}")
    if not compiling and memory_budget is not None:
        say(f"activation_memory_budget={memory_budget:g} has no effect: it is the compiled layers' (compile_layers "
            "is off)")
    if use_graphs:
        when = ("when a row of it first comes" if cfg.warmup_shapes == "lazy"
                else "ahead of training where the plan tells it")
        say(f"cuda_graphs ({graphs_why}): the decoder stack replays as CUDA graphs; rows padded to a multiple of "
            f"{row_multiple} tokens; each row shape is recorded once, {when}; cuda_graphs=false turns it off")
    elif graphs_why:
        say(graphs_why)
    run.compiling, run.use_graphs, run.row_multiple = compiling, use_graphs, row_multiple


def _setup_loss_module(run: Run) -> None:
    """The module the engine runs (model + loss head), its matmuls' row counts, and the embedding table's place."""
    cfg, say, device, model, per_sample = run.cfg, run.say, run.device, run.model, run.per_sample
    loss_module = LossModule(model, fused_cross_entropy=cfg.fused_cross_entropy,
                             bounds_as_inputs=per_sample, row_bound=run.use_graphs)
    if cfg.engine != "ddp":  # FSDP / DeepSpeed gather weights in module hooks: transformers' own forward there
        loss_module.row_forward = False
    # gemm_row_multiple: the loss head's rows, and the tower's patches where the packed-row path runs the tower
    # (transformers' own forward checks the features' count against the placeholders: no padding image there)
    gemm_multiple = loss_head.gemm_multiple_for(cfg.gemm_row_multiple, device, cfg.engine)
    loss_module.gemm_row_multiple = gemm_multiple
    media_multiple = gemm_multiple if per_sample and loss_module.row_forward else 0
    if gemm_multiple:
        what = "the loss head's label rows" + (" and each medium's vision-tower patches" if media_multiple else "")
        say(f"gemm_row_multiple={gemm_multiple}{' (auto)' if cfg.gemm_row_multiple == 'auto' else ''}: {what} rounded "
            "up to a few multiples of it (every one up to 15, then 8 per doubling): their matmul shapes repeat across "
            "steps; gemm_row_multiple=0 turns it off")
    run.encoder.pixel_dtype = next(loss_module.visual.parameters()).dtype
    host_table = None
    if cfg.host_embeddings:  # rows looked up on the host, the table off the GPU (put back after the loop)
        why = ("it needs packed rows with per_sample attention"
               if not (run.packed and per_sample and loss_module.row_forward)
               else "it runs in one process" if run.dist.enabled else "")
        try:
            host_table = None if why else host.embeddings_to_host(model)
        except ValueError as e:
            why = str(e)
        if why:
            _lever_unavailable(run, "host_embeddings", why)
        else:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            gib = host_table.numel() * host_table.element_size() / 2**30
            say(f"host_embeddings: the input-embedding table ({gib:.2f} GiB) stays in host memory; each row's tokens "
                "are looked up there")
    if cfg.activation_offloading is True:  # the decoder stack's recomputed layers keep their inputs on the host
        why = ("it needs gradient checkpointing" if not cfg.gradient_checkpointing
               else "it needs packed rows with per_sample attention"
               if not (run.packed and per_sample and loss_module.row_forward) else "")
        if why:
            _lever_unavailable(run, "activation_offloading", why)
        else:
            from qvl.data.packing import language_model

            offload.install(language_model(model), model, device)
            say("activation_offloading: recomputed decoder layers keep their inputs in pinned host memory (a copy each "
                "way per layer and step)")
    run.loss_module, run.gemm_multiple, run.media_multiple, run.host_table = (loss_module, gemm_multiple,
                                                                              media_multiple, host_table)


def _lever_unavailable(run: Run, key: str, why: str) -> None:
    """A host-memory lever this run cannot take after all: an error, since the memory plan counted it (with
    force=true, a line and the run goes on without it)."""
    auto = key in run.auto_on
    if auto and run.cfg.force:
        run.say(f"{key} (auto) stays off: {why}; force=true: trying without it")
        return
    raise QvlError(f"{key}{' (auto: the memory plan needs it)' if auto else ''}: {why}", where=key,
                   fix=f"{key}: false" + (" and a run that fits without it, or force=true to try anyway" if auto
                                          else ""))


def _setup_engine(run: Run) -> None:
    """Engine (DDP / DeepSpeed / FSDP2, see qvl.train.distributed), optimizer (one group per component x decay, each
    with its LR) and schedule; then what the run is, said once."""
    cfg, say, dist, device, model, plan = run.cfg, run.say, run.dist, run.device, run.model, run.plan
    eng = distributed.prepare(run.loss_module, model, cfg, dist, device, optimizers.lr_lambda(cfg, plan.total_steps))
    optimizer, scheduler = eng.optimizer, eng.scheduler
    for note in eng.notes:
        say(note)
    decoder_graphs = None
    if run.use_graphs:  # the backward graphs add into standing .grad tensors (graphs.standing_grads)
        from qvl.train.graphs import DecoderGraphs

        graphs.standing_grads(eng.trainable)
        eng.standing_grads = True
        decoder_graphs = run.loss_module.graphs = DecoderGraphs(model, log=say)
        tower = run.tower_compile
        if tower is not None:  # the compile's first run of the tower is GPU work no recording may meet
            decoder_graphs.hold = lambda: ("a new row shape waits for the vision tower's compile in another thread "
                                           "to end" if tower.compiling else "")
    # the logged `lr`: the LLM's group (learning_rate) when it trains, else the first group's
    main_group = next((g["name"] for g in optimizer.param_groups if g["name"].split("/")[0] == "llm"),
                      optimizer.param_groups[0]["name"])

    packed, attn = run.packed, run.attn
    say(f"model {cfg.model_name_or_path} ({'bf16' if cfg.bf16 else 'fp32'}, {cfg.attn_implementation}"
        f"{f'; packed rows with {attn} attention' if packed else ''}"
        f"{', gradient checkpointing' if cfg.gradient_checkpointing else ''}) on {device}"
        f"{f', {dist.world_size} ranks' if dist.enabled else ''}"
        f"{f', engine {eng.name}' + (f' ZeRO-{eng.zero}' if eng.zero else '') + (' offload' if eng.offload else '') if eng.name != 'ddp' else ''}")
    say(comp.render_table(comp.component_table(model, cfg)))
    if cfg.lora_enable:
        say(f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha:g} dropout={cfg.lora_dropout:g} on {comp.lora_regex(cfg)}")
    eff = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * dist.world_size
    unit = "packs" if cfg.data_packing else "samples"
    say(f"data {len(run.records):,} {'packs' if cfg.data_packing else 'records'} ({cfg.dataset_use}); "
        f"{plan.steps_per_epoch} steps/epoch at {eff} {unit}/step"
        f"{' (each micro-batch one packed row)' if packed else ''}; {plan.total_steps} steps"
        f"{'; samples split between ranks by estimated tokens (balance_tokens)' if plan.balanced else ''}")
    run.eng, run.optimizer, run.scheduler, run.decoder_graphs, run.main_group = (eng, optimizer, scheduler,
                                                                                 decoder_graphs, main_group)


def _check_disk(run: Run) -> None:
    """Before any GPU time: a disk too small for the run's first checkpoint (or its trained model) stops it; one
    that would fill up later says so. A full fine-tune of a 4B model writes ~24 GiB a checkpoint; a disk that
    filled up at the final save lost a whole run's work (a benchmark's, on a 64 GiB disk, 2026-12-05)."""
    from qvl.train.preflight import disk_needed
    from qvl.utils.fs import GIB, free_bytes

    free = free_bytes(run.out)
    if not run.is_main or run.eng.sharded or free is None:  # sharded weights: each rank holds a part
        return
    cfg = run.cfg
    first, most, how = disk_needed(
        sum(p.numel() * p.element_size() for p in run.trainable),
        sum(p.numel() for p in run.model.parameters()) * run.load_dtype.itemsize, cfg.lora_enable,
        run.start_step, run.plan.total_steps, cfg.save_strategy, cfg.save_steps, cfg.save_total_limit)
    if first > free:
        raise QvlError(f"not enough disk space in {run.out}: the run's first write needs about {first / GIB:.1f} GiB "
                       f"({how}), {free / GIB:.1f} GiB free", where="output_dir",
                       fix="free space on that disk, or set output_dir to a larger one")
    if most > free:
        run.say(f"warning: this run's outputs grow to about {most / GIB:.1f} GiB in {run.out} ({how}), "
                f"{free / GIB:.1f} GiB free: it would run out of disk space before the end (save_total_limit keeps "
                f"fewer checkpoints, save_steps saves less often)")


def _resume(run: Run) -> None:
    """Resume from a checkpoint (when there is one), write the run's config, start the tracker."""
    cfg, say, out, plan = run.cfg, run.say, run.out, run.plan
    start_step = 0
    if run.resume_from is not None:
        state = ckpt.load_checkpoint(run.resume_from, run.model, run.optimizer, run.scheduler, rank=run.dist.rank,
                                     read_state=distributed.state_reader(run.eng, run.model))
        start_step = int(state["step"])
        say(f"resumed from {run.resume_from} (step {start_step}/{plan.total_steps})")
    if run.is_main:
        import yaml

        from qvl.utils.fs import atomic_write_text

        atomic_write_text(out / ckpt.RUN_CONFIG, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    from qvl.train.track import Tracker

    run.start_step = start_step
    _check_disk(run)
    run.tracker = Tracker(out, cfg, plan.total_steps, start_step, run.dist.rank, log=say, device=run.device)


def _warm_up(run: Run) -> None:
    """The shapes training will meet, met before it: CUDA graphs recorded, the padded matmuls run once."""
    cfg, say, device, plan, load_dtype = run.cfg, run.say, run.device, run.plan, run.load_dtype
    decoder_graphs = run.decoder_graphs
    # no cast cache under CUDA graphs: a cached cast made while recording would live in the graphs' memory pool
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16, cache_enabled=not run.use_graphs)
    t_warm = time.perf_counter()
    if decoder_graphs is not None:
        if cfg.warmup_shapes == "lazy":  # shapes recorded as rows come; the shared buffers sized once, now
            decoder_graphs.reserve(batches.longest_planned_row(plan, cfg) or 0, load_dtype, device)
        else:
            from qvl.train.graphs import planned_row_shapes

            shapes = planned_row_shapes(batches.planned_rows(plan, run.start_step, GRAPH_STEPS_AHEAD, cfg.row_budget()),
                                        run.row_multiple)
            say(f"warming up: compiling the decoder layers and recording {len(shapes)} row shapes (warmup_shapes=ahead)")
            t0 = time.perf_counter()
            try:
                with autocast:
                    n = decoder_graphs.prerecord(shapes, load_dtype, device)
            except torch.OutOfMemoryError as e:
                raise out_of_memory(e, cfg, run.use_graphs, run.ckpt_ratio) from e
            if n:
                say(f"cuda_graphs: recorded {n} row shapes ahead ({shapes[-1][0]:,}-{shapes[0][0]:,} tokens, "
                    f"estimated for the next {GRAPH_STEPS_AHEAD} steps) in {time.perf_counter() - t0:.1f} s; a row "
                    "of another shape is recorded when it comes")
    if run.gemm_multiple and cfg.engine == "ddp" and cfg.warmup_shapes == "ahead":  # the shapes padding makes, met now
        t0 = time.perf_counter()
        with autocast:
            heads, towers = run.loss_module.warm_gemm_shapes(batches.longest_planned_row(plan, cfg) or 0,
                                                             media=bool(run.media_multiple))
        if heads or towers:
            say(f"gemm_row_multiple: ran the loss head at its {heads} row counts and the vision tower at its {towers} "
                f"patch counts before training, in {time.perf_counter() - t0:.1f} s")
    t_warm = time.perf_counter() - t_warm
    if (run.compiling or decoder_graphs is not None) and cfg.warmup_shapes == "lazy":
        say("warming up: the first steps compile the layers" + (" and record each new row shape as a CUDA graph"
                                                                 if decoder_graphs is not None else "")
            + " (minutes on an 8B model the first time; compiled code is kept in "
            + (os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "torch's temporary folder")
            + " for later runs); tok/s and ETA count the steps after warm-up")
    run.autocast, run.t_warm = autocast, t_warm


def _fetch_steps(run: Run, rows_in_workers: bool):
    """Yield (step, [micro-batches]) from ``start_step`` on, following the plan."""
    cfg, plan, device = run.cfg, run.plan, run.device
    step = run.start_step
    while step < plan.total_steps:
        epoch, _ = plan.step_micro(step)
        first = plan.step_micro(step)[1].start
        workers = loader_workers(cfg.dataloader_num_workers, device)
        it = batches.micro_batches(plan, run.encoder, epoch, first, run.pad_id, workers,
                           pack_rows=rows_in_workers, pin_memory=device.type == "cuda", row_multiple=run.row_multiple,
                           row_budget=cfg.row_budget() if rows_in_workers else None,
                           media_multiple=run.media_multiple)
        while step < plan.total_steps and plan.step_micro(step)[0] == epoch:
            n = len(plan.step_micro(step)[1])
            yield step, [next(it) for _ in range(n)]
            step += 1


def _record_seconds(run: Run) -> float:
    return run.decoder_graphs.record_s if run.decoder_graphs is not None else 0.0


def _report(run: Run, callbacks, done: int, queued: tuple, n_labels: float, n_tokens: int, step_lrs: dict,
            built: str, queued_at: float) -> dict:
    """Read a finished step's loss and gradient norm (``queued`` by :func:`host.queue_host_read` at the end of
    the step: the read waits for that step only), log them and run the callbacks.

    A step's time runs from the previous step's end to its own: on CUDA by the GPU's clock (the wait for this
    step's build included), on the CPU, where queueing a step is running it, from one step queued (``queued_at``) to
    the next. ``built`` (what building it compiled or recorded) says whether that time was warm-up."""
    cfg, dist, device, plan = run.cfg, run.dist, run.device, run.plan
    loss_sum, grad_norm = host.host_read(queued)
    seconds = host.seconds_between(run.last_queued, queued)
    if seconds is None and run.last_queued is not None and queued[0] is None:
        seconds = queued_at - run.last_queued_at
    run.last_queued, run.last_queued_at = queued, queued_at
    warm = _joined(built, run.profiler is not None and run.profiler.covers(done) and "profiled")
    step_loss = dist.all_sum(loss_sum, device) / max(n_labels, 1.0)
    run.losses.append(step_loss)
    metrics = {"loss": step_loss, "lr": step_lrs[run.main_group],
               "epoch": done / plan.steps_per_epoch, "label_tokens": n_labels}
    if grad_norm is not None:
        metrics["grad_norm"] = grad_norm
    for name, lr in step_lrs.items():
        metrics[f"lr/{name}"] = lr
    failures = run.compile_failures.take() if run.compile_failures is not None else []
    if run.is_main:
        compile.say_failures(failures, run.out, run.say)
    step_row = run.tracker.step(done, metrics, int(dist.all_sum(n_tokens, device)),
                                log_now=done % cfg.logging_steps == 0 or done == plan.total_steps,
                                warm=warm, seconds=seconds)
    if not math.isfinite(step_loss):
        raise QvlError(f"loss is {step_loss} at step {done}", fix="lower learning_rate, or use bf16=true "
                       "instead of fp16; the last checkpoint is intact")
    for cb in callbacks:
        cb(done, step_row)
    return step_row


def _joined(*notes) -> str:
    return ", ".join(n for n in notes if n)


def _run_steps(run: Run, callbacks) -> None:
    """The loop: each step's numbers are read once the next step is queued (:func:`_report`). Afterwards (also on an
    error) the embedding table goes back to the device and the CUDA graphs' memory is freed."""
    cfg, say, dist, device, plan, out = run.cfg, run.say, run.dist, run.device, run.plan, run.out
    model, eng, optimizer, scheduler = run.model, run.eng, run.optimizer, run.scheduler
    host_table, decoder_graphs, start_step, pad_id = run.host_table, run.decoder_graphs, run.start_step, run.pad_id
    t_start, t_load, t_warm = run.t_start, run.t_load, run.t_warm
    tower_compile = run.tower_compile
    warm_events = WarmUpEvents(decoder_graphs, run.loss_module, tower_compile)
    skipped = run.skipped
    fakes = distributed.FakeMedia(run.processor, cfg)  # label-free image / video for balancing ranks (made when needed)
    # packed rows built in the loader workers, off the step's thread: one process, and packed_row_tokens (if set)
    # regroups one micro-batch per step (with several, the loop regroups the step's samples across them)
    rows_in_workers = not dist.enabled and (not cfg.row_budget() or cfg.gradient_accumulation_steps == 1)

    def report(pending) -> dict:
        return _report(run, callbacks, *pending)

    pending = None
    t_first, compiled_before, recorded_before = time.perf_counter(), compile.compile_seconds(), _record_seconds(run)
    cached_before, compiled_marker = compile.cache_counts(), compile.compile_marker()
    watch = StepWatch(run.tracker.write) if run.is_main else None  # a long step says what it does meanwhile
    profiler = run.profiler = (StepProfiler(parse_steps(cfg.profile_steps), out, device, say, start_step)
                               if cfg.profile_steps and run.is_main else None)
    after_save = ""  # a checkpoint written between two steps: the GPU waited for it in the next step's time
    try:
        for step, items in _fetch_steps(run, rows_in_workers):
            if watch is not None:
                watch.begin(step + 1)
            if profiler is not None:
                profiler.begin(step + 1)
            if cfg.row_budget() and not rows_in_workers:  # the step's samples regrouped into rows of up to N
                items = batches.rows_by_budget(items, cfg.row_budget())  # tokens (before balancing: ranks compare rows)
                if dist.enabled:  # ranks may end with different row counts: pad with (fake) rows
                    items = distributed.pad_micro_batches(items, device)
            if dist.enabled:  # every rank runs as many micro-batches, and the vision tower as often, as the others
                items = distributed.balance_media(eng, items, fakes, device, pad_id)
            step_batches, rows = [], []
            for item in items:
                if item.get("error"):
                    raise QvlError(*item["error"])
                skipped.update(item["skipped"])
                for why, example in item.get("examples", {}).items():
                    run.encoder.examples.setdefault(why, example)
                if item.get("samples"):
                    rows.append(item["samples"])
                elif item.get("batches"):
                    step_batches += item["batches"]
                elif item["batch"] is not None:
                    step_batches.append(item["batch"])
            step_batches += [batches.pack_micro_batch(r, run.rope_index, run.row_multiple, pad_id, run.media_multiple)
                             for r in rows]
            n_labels = dist.all_sum(float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in step_batches)), device)
            n_tokens = sum(batches.batch_tokens(b) for b in step_batches)
            loss_sum = torch.zeros((), device=device)  # stays on the device: one host sync per step (below)
            step_lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}  # what this step uses (before the schedule moves)
            for j, batch in enumerate(step_batches):
                if host_table is not None:
                    batch["qvl_embeds"] = host.host_embed(host_table, batch["input_ids"], pin=device.type == "cuda")
                # engines average over ranks
                part = distributed.micro_step(eng, batches.to_device(batch, device), n_labels / dist.world_size,
                                              last=j == len(step_batches) - 1, autocast=run.autocast)
                loss_sum += part
            grad_norm = distributed.finish_step(eng)
            done = step + 1
            if done == start_step + 1:  # one wait, once: when the first step really finished
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                say(first_step_line(time.perf_counter() - t_start, t_load, t_warm, time.perf_counter() - t_first,
                                    compile.compile_seconds() - compiled_before,
                                    _record_seconds(run) - recorded_before,
                                    tuple(b - a for a, b in zip(cached_before, compile.cache_counts())),
                                    compile.compiled_functions(compiled_marker)))
                if run.is_main:
                    compile.write_compile_times(run.out, "after the first step")
            if tower_compile is not None and not tower_compile.started and tower_compile.start():
                say(f"compiling {tower_compile.what} in the background: the steps run it uncompiled until it is "
                    "done, and count as warm-up")
            saving = cfg.save_strategy == "steps" and done % cfg.save_steps == 0 and done < plan.total_steps
            # this step's numbers are copied to the host behind its work now and read once the next step is queued:
            # the read waits for this step only, so the GPU runs the next step while the host builds the one after
            # (a checkpoint reads its own step's first)
            queued = host.queue_host_read(loss_sum, grad_norm)
            built, after_save = _joined(after_save, warm_events.since_last()), ""  # what this step's build warmed up
            if pending is not None:
                run.row = report(pending)
            pending = (done, queued, n_labels, n_tokens, step_lrs, built, time.perf_counter())
            if watch is not None:
                watch.end()
            if profiler is not None:
                profiler.end(done)
            if saving:
                run.row, pending = report(pending), None
                path = ckpt.save_checkpoint(out, done, model, optimizer, scheduler,
                                            {"step": done, "epoch": done / plan.steps_per_epoch,
                                             "total_steps": plan.total_steps, "seed": cfg.seed},
                                            rank=dist.rank, save_total_limit=cfg.save_total_limit,
                                            write_state=distributed.state_writer(eng, model))
                say(f"saved {path}")
                after_save = "a checkpoint written before it"
        if pending is not None:
            run.row = report(pending)
        if tower_compile is not None and tower_compile.compiling:  # a short run: the thread ends before the process
            say(f"training ended while {tower_compile.what} was compiling in the background: waiting for it to end")
            tower_compile.wait()
        if run.is_main:
            compile.write_compile_times(run.out, "at the end of training")

    except torch.OutOfMemoryError as e:
        raise out_of_memory(e, cfg, run.use_graphs, run.ckpt_ratio) from e
    finally:  # the recordings' memory goes back (benchmarks train the same model object again)
        if tower_compile is not None and tower_compile.compiling:  # stopped by an error: a little time for the
            tower_compile.wait(timeout=60)  # thread's GPU work to end before the process does
        if watch is not None:
            watch.close()
        if profiler is not None:
            profiler.close()
        if decoder_graphs is not None:
            say(f"cuda_graphs: {decoder_graphs.summary()}")
            decoder_graphs.close()


def _save_final(run: Run) -> TrainResult:
    """Final: last checkpoint (resumable) + servable folder, and the run's summary."""
    cfg, say, dist, out, plan, model = run.cfg, run.say, run.dist, run.out, run.plan, run.model
    eng, start_step, losses, load_dtype = run.eng, run.start_step, run.losses, run.load_dtype
    done = max(start_step, plan.total_steps)
    if cfg.save_strategy == "steps" and start_step < plan.total_steps:
        ckpt.save_checkpoint(out, done, model, run.optimizer, run.scheduler,
                             {"step": done, "epoch": done / plan.steps_per_epoch, "total_steps": plan.total_steps,
                              "seed": cfg.seed}, rank=dist.rank, save_total_limit=cfg.save_total_limit,
                             write_state=distributed.state_writer(eng, model))
    total_skipped = dict(run.skipped)
    files = []
    if run.fp32_masters and not cfg.lora_enable and not eng.sharded:  # the servable weights in the model's dtype
        for p in run.trainable:
            p.data = p.data.to(load_dtype)
    # sharded weights (ZeRO-3, FSDP) are gathered onto rank 0: every rank joins
    gathered = distributed.full_state_dict(eng, model, cfg.lora_enable, dtype=None if cfg.lora_enable else load_dtype)
    if run.is_main:
        files = ckpt.save_final(out, model, run.processor, cfg,
                                extra={"steps": done, "final_loss": losses[-1] if losses else None,
                                       "skipped": total_skipped}, state_dict=gathered)
    plot = run.tracker.close()
    if total_skipped:
        say("skipped samples: " + ", ".join(f"{n} {why}" for why, n in total_skipped.items()))
        for why, ex in run.encoder.examples.items():
            say(f"  e.g. {ex}")
    seconds = time.perf_counter() - run.t_start
    say(f"done: {done} steps in {seconds:.1f} s; servable output in {out}"
        f"{f'; loss curve {plot}' if plot else ''}")
    if dist.enabled:
        torch.distributed.barrier()
    row, resume_from = run.row, run.resume_from
    return TrainResult(out, done, start_step, losses, total_skipped, seconds,
                       row.get("tokens_per_s") or 0.0, row.get("peak_mem_gib", 0.0), files,
                       str(resume_from) if resume_from else None)
