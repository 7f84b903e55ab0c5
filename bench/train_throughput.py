"""Training throughput, side by side, on the same samples in the same order (run on an H100).

    python bench/train_throughput.py --model 8B --steps 15 --profile-out profile.txt
    python bench/train_throughput.py --model tiny --device cpu --steps 2 --samples 16   # smoke test

Contestants (LoRA r=64, alpha=128 on the LLM's q/k/v/o unless said otherwise, AdamW, bf16 weights):
  baseline      plain transformers + peft: batches of 4 padded to the longest, sdpa, gradient
                checkpointing, the model's own loss (what TRL / LLaMA-Factory without packing do)
  flatten       the official data_flatten semantics: the 4 samples concatenated into one row with
                per-sample mRoPE; sdpa with a block-diagonal mask (flash-attn is not installable here)
  qvl-*         `qvl train`'s real code path: qvl.train.loop.train with a TrainConfig over the same
                workload written to disk (DataLoader workers encode it), on the same in-memory model
                (load_model is patched to hand it over; the final servable save is skipped). Levers are
                added one at a time: qvl-fused (fused linear+CE, fused AdamW; every layer recomputed),
                qvl-selective (gradient_checkpointing_ratio fitted to the baseline's peak memory),
                qvl-per-sample (+ packed_attention: per_sample, no L x L mask: one flash-attention varlen
                call per layer on a GPU), qvl-per-sample-keep10/14 (10 / 14 layers not recomputed;
                all qvl rows run the vision tower's sdpa without cuDNN and keep LoRA inputs in bf16 under
                autocast; qvl-keep10-cudnn-vision / qvl-keep10-lora-fp32-cast switch one of those off),
                qvl-keep10-compile (+ compile_layers: norms, MLPs and whole attention modules, per_sample
                attention taking its sample bounds as inputs; 8 warm-up steps), qvl-auto (the loop's
                default gradient_checkpointing_ratio: auto, sized to the card, not to the baseline's memory),
                qvl-compile (+ compile_layers with the dense-mask sdpa rows),
                qvl-all-linear (qvl's default LoRA targets, per_sample attention), qvl-loop-plain
                (levers off), qvl-rows16k (informational: 16 samples per step in rows of <= 16k tokens),
                qvl-auto-compile (the loop's defaults; on an H100 they include cuda_graphs, every row shape
                recorded before the first step), qvl-graphs-off (the same without CUDA graphs),
                qvl-budget{95,90,80,70}-nockpt (nothing checkpointed, the compiler's partition under
                activation_memory_budget), qvl-fit-b80 (4 layers recomputed whole, 32 kept under budget 0.8:
                within the baseline's memory at 8B), qvl-mlp-keep4 (the defaults until 2026-11-27: 32 layers
                recomputing their MLP), qvl-pad128 (the defaults, rows padded to 128-token multiples),
                qvl-read-late (the defaults with each step's numbers copied to the host only when read),
                qvl-workers8 (the defaults with 8 DataLoader workers), qvl-gemm0 / qvl-gemm512 (the defaults
                with gemm_row_multiple off / 512 instead of auto's 128: loss-head rows and tower patches rounded up
                on a ladder of multiples, each shape met before training), qvl-fit-host (host_embeddings).
  baseline-full plain transformers full fine-tuning (LLM + merger, bf16 weights and AdamW states as the Hugging Face
                Trainer keeps them for a bf16 model), padded batches, checkpointing: the reference for cli:full_4b
  baseline-qlora  transformers + peft + bitsandbytes on qlora_32b_24gb.yaml's problem (on this --model): the saved
                weights loaded in NF4 (double quantisation, bf16 compute, vision tower and lm_head bf16), its LoRA,
                batch and schedule, padded, on the CLI row's samples in its order: the reference of cli:qlora_32b_24gb
  cli:EXAMPLE   `qvl train examples/EXAMPLE.yaml` through the CLI in its own process, as shipped but for the model
                (these random weights, saved), the data (this workload) and max_steps (--cli-steps); its own
                batch, LoRA targets and vision budget (bench/train_cli.py). cli:EXAMPLE@GPU: the same on an
                emulated card (QVL_GPU=GPU, e.g. rtx4090: the run caps its allocator to that card's memory);
                cli:EXAMPLE+key=value[+key=value]: with those `qvl train` overrides (e.g. +compile_layers=false)
  baseline-yaml transformers + peft on lora_8b_24gb.yaml's own problem (its LoRA targets, dropout, schedule, batch,
                vision budget), padded, on the CLI row's samples in its order: the reference for its losses
  baseline-video the same on lora_8b_video.yaml's problem (batch 1 with 8 accumulated) for --workload video:
                the speed and loss reference of cli:lora_8b_video
  baseline-moe  the same on lora_30b_a3b.yaml's problem for a MoE model (--model 30B-A3B): LoRA on the attention
                and on the experts through peft's target_parameters (its default grouped_mm experts, the adapters
                folded into the expert stacks each forward); the speed and loss reference of cli:lora_30b_a3b.
                A baseline row +key=value[+key=value]: the YAML with those settings, the reference of the CLI row
                with the same ones (baseline-moe+lora_r=16 for cli:lora_30b_a3b+lora_r=16: an 80 GB card)
  recipe        the reference's one-card LoRA command line (torchrun -m qvl.train --deepspeed zero2.json ...)
                with lora_8b_24gb.yaml's batch settings, without DeepSpeed installed
  baseline-liger  the baseline with Liger's Qwen3-VL kernels (RoPE, RMSNorm, fused linear + cross-entropy), as
                TRL / LLaMA-Factory run it with use_liger_kernel (needs liger-kernel; always runs last: it patches
                transformers' Qwen3-VL module for the whole process)
Every contestant (but qvl-rows16k) sees the same 4 samples per optimizer step, in the loop's seeded order, so losses are comparable step by step.
Useful tokens are non-padding tokens. MFU counts 4 x LLM non-embedding params per token (LoRA:
forward + input gradients, no recompute; MoE: the active params, top-k of the experts) plus causal attention,
over 790 TFLOP/s (H100 dense bf16).
"""

from __future__ import annotations

import argparse
import atexit
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_cli  # noqa: E402
from provenance import source_tree  # noqa: E402
from workload import VIDEO_BUDGET, histogram, make_video_workload, make_workload  # noqa: E402

from qvl.config.vision import VisionBudget  # noqa: E402
from qvl.data.collate import collate  # noqa: E402
from qvl.data.packing import pack, rope_index_fn, use_packed_attention  # noqa: E402
from qvl.data.preprocess import encode  # noqa: E402
from qvl.data.samples import parse_sample  # noqa: E402

PEAK_TFLOPS = 790.0
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = QKVO + ["gate_proj", "up_proj", "down_proj"]


def build(model_name: str, device: str):
    if model_name in ("tiny", "tiny-moe"):
        from qvl.models.build import tiny_parts

        model, processor = tiny_parts(variant="moe" if model_name == "tiny-moe" else "default")
        return model.to(device), processor
    from qvl.models.build import random_model

    return random_model(model_name, dtype=torch.bfloat16, device=device)


def llm_flops_per_token(model, lengths: list[int]) -> float:
    tc = model.config.text_config
    active = tc.num_experts_per_tok / tc.num_experts if getattr(tc, "num_experts", 0) else 1.0  # MoE: top-k of E
    n = sum(p.numel() * (active if ".mlp.experts." in name else 1.0) for name, p in model.named_parameters()
            if "language_model" in name and "embed_tokens" not in name and "lora_" not in name)
    q_dim = tc.num_attention_heads * tc.head_dim
    # causal attention per sequence: QK^T and PV, forward 2*2*L^2*q_dim/2, backward 2x forward
    attn = sum(3 * 2 * L * L * q_dim * tc.num_hidden_layers for L in lengths)
    return 4 * n + attn / max(1, sum(lengths))


def add_lora(model, targets, r=64, alpha=128):
    from peft import LoraConfig, get_peft_model

    regex = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=regex))


def set_checkpointing(model, on: bool):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()


def step_padded(model, group, pad_id, device):
    batch = {k: v.to(device) for k, v in collate(group, pad_id).items()}
    return model(**batch, use_cache=False).loss


def step_flatten(model, group, pad_id, device):
    batch = pack(group, rope_index_fn(model))
    batch.pop("seq_lens")
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return model(**batch).loss


def run(name, model, groups, step_fn, pad_id, device, warmup, flops_per_token, attn=None):
    if attn:
        use_packed_attention(model, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()
    losses, times, tokens, samples = [], [], 0, 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i, group in enumerate(groups):
        t0 = time.perf_counter()
        loss = step_fn(model, group, pad_id, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
            tokens += sum(len(e) for e in group)
            samples += len(group)
        print(f"  {name} step {i}: loss {losses[-1]:.4f} {dt * 1000:.0f} ms", flush=True)
    total = sum(times)
    res = {
        "tokens_per_s": tokens / total if total else 0.0,
        "samples_per_s": samples / total if total else 0.0,
        "step_s": total / max(1, len(times)),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else None,
        "losses": losses,
        "final_loss_mean5": sum(losses[-5:]) / len(losses[-5:]),
    }
    res["mfu"] = res["tokens_per_s"] * flops_per_token / (PEAK_TFLOPS * 1e12)
    del opt
    return res


# --------------------------------------------------------------------------------------------------
# qvl: the real `qvl train` loop (qvl.train.loop.train) on the same model object and the same samples
# --------------------------------------------------------------------------------------------------

QKVO_REGEX = r"model\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"


def loop_config(args, model_dir: Path, registry: Path, out: Path, **overrides):
    """The TrainConfig of a qvl contestant: the baseline's learning problem (LoRA r64/a128 on q/k/v/o, AdamW
    lr 1e-4 constant, clip 1.0, 4 samples per step, the workload's vision budget) plus ``overrides``."""
    from qvl.train.config import build_config

    values = dict(model_name_or_path=str(model_dir), dataset_use="workload", dataset_registry=str(registry),
                  output_dir=str(out), lora_enable=True, lora_r=64, lora_alpha=128, lora_dropout=0.0,
                  lora_target_regex=QKVO_REGEX, learning_rate=1e-4, lr_scheduler_type="constant", weight_decay=0.0,
                  max_grad_norm=1.0, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                  max_steps=args.warmup + args.steps, bf16=args.device.startswith("cuda"), gradient_checkpointing=True,
                  gradient_checkpointing_ratio=1.0,  # rows set their own; qvl-auto uses the loop's default
                  # whole layers recomputed unless a row says otherwise (qvl-*-mlp; qvl-auto-compile: the default)
                  gradient_checkpointing_scope="layer",
                  data_flatten=True, save_strategy="no", report_to="none", logging_steps=5, seed=0, resume=False,
                  model_max_length=4096, force=True, warmup_shapes="ahead",  # every shape met before the timed steps
                  packed_row_tokens=None,  # a row per micro-batch, as the baseline's batches, unless a row says
                  **budget_keys(args))
    values.update(overrides)
    return build_config(values)


def budget_keys(args) -> dict:
    """The vision budget the harness encodes with (and its qvl rows train with): the video workload's clips keep
    their frames and size (the video YAML's budget)."""
    return dict(BUDGET_KEYS, **VIDEO_BUDGET) if getattr(args, "workload", "mixed") == "video" else BUDGET_KEYS


BUDGET_KEYS = dict(min_pixels=64 * 1024, max_pixels=1400 * 1024, video_fps=2.0, video_min_frames=4,
                   video_max_frames=16, video_min_pixels=4096, video_max_pixels=16 * 256 * 1024)


def strip_adapters(model) -> None:
    """Undo what a qvl run did to the shared base model: LoRA layers, compiled parts, checkpointing."""
    from qvl.train import compile

    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(module, "lora_A"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, base)
    compile.uncompile(model)
    import torch._dynamo

    torch._dynamo.reset()  # the next row compiles afresh (its settings may differ), below dynamo's recompile limit
    if hasattr(model, "peft_config"):
        del model.peft_config
    for p in model.parameters():
        p.requires_grad_(False)
    set_checkpointing(model, False)
    if hasattr(model, "disable_input_require_grads"):
        try:
            model.disable_input_require_grads()
        except AttributeError:  # no hook registered
            pass
    use_packed_attention(model, "sdpa")


class StepClock:
    """A train() callback: wall time and tokens of every optimizer step (the loop syncs once per step)."""

    def __init__(self, profile_steps: tuple[int, int] | None = None, profile_out: Path | None = None):
        self.marks: list[tuple[int, float, float]] = []  # (step, time, cumulative tokens)
        self.t_start = time.perf_counter()
        self.profile_steps, self.profile_out, self.prof, self.prof_t0 = profile_steps, profile_out, None, 0.0
        self.trace = False  # also export the chrome trace beside profile_out and report the GPU's idle gaps
        self.paused = 0.0  # seconds spent writing the profile: not a step's time

    timeline = None

    def __call__(self, step: int, row: dict) -> None:
        now = time.perf_counter()
        if self.timeline is not None:
            self.timeline.step_done(now - self.paused - (self.marks[-1][1] if self.marks else self.t_start))
            now = time.perf_counter()  # the timeline's own sync is not the next step's time
        self.marks.append((step, now - self.paused, row["tokens"]))
        if self.profile_steps and step == self.profile_steps[0]:
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                           torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self.prof_t0 = time.perf_counter()
        elif self.prof is not None and step == self.profile_steps[1]:
            torch.cuda.synchronize()
            wall = time.perf_counter() - self.prof_t0
            self.prof.__exit__(None, None, None)
            write_profile(self.prof, wall, step - self.profile_steps[0], self.profile_out, trace=self.trace)
            self.prof = None
            self.paused += time.perf_counter() - now

    def stats(self, warmup: int, last: int, samples_per_step: int) -> dict:
        timed = [(s, t, k) for s, t, k in self.marks if warmup <= s <= last]  # mark of step `warmup` opens it
        if len(timed) < 2:
            return {"tokens_per_s": 0.0, "samples_per_s": 0.0, "step_s": 0.0}
        (s0, t0, k0), (s1, t1, k1) = timed[0], timed[-1]
        dt, n = t1 - t0, s1 - s0
        return {"tokens_per_s": (k1 - k0) / dt, "samples_per_s": n * samples_per_step / dt, "step_s": dt / n,
                "timed_steps": n, "startup_and_warmup_s": t0 - self.t_start}


def write_profile(prof, wall: float, steps: int, out: Path | None, trace: bool = False) -> None:
    """GPU busy fraction over ``steps`` steps and the kernels that take the time; with ``trace`` the chrome trace
    beside ``out`` and where the GPU waited (bench/experiments/trace_gaps.py)."""
    events = prof.key_averages()

    def dev(e):
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0

    # kernels only: an aten op's self device time is its kernels' time again
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(dev(e) for e in kernels) / 1e6
    kinds = {"matmul": ("nvjet", "gemm", "cutlass", "xmma", "cublas"), "attention": ("flash", "fmha", "attention"),
             "triton (fused elementwise / norms)": ("triton_",)}
    by_kind: dict = {}
    for e in kernels:
        kind = next((k for k, pats in kinds.items() if any(p in e.key.lower() for p in pats)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + dev(e) / 1e6
    lines = [f"  kernels: {k:<36} {t * 1e3 / steps:8.1f} ms/step  {t / busy:6.1%}" for k, t in
             sorted(by_kind.items(), key=lambda kv: -kv[1])]
    # what launched them (device time of the kernels under each range; backward runs in CompiledFunctionBackward)
    ranges = ("bench: vision tower", "bench: loss", "CompiledFunction", "CompiledFunctionBackward", "Optimizer.step")
    for e in events:
        if any(e.key.startswith(r) for r in ranges):
            total = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0) or 0) / 1e6
            lines.append(f"  range:   {e.key[:36]:<36} {total * 1e3 / steps:8.1f} ms/step  ({e.count // steps} calls/step)")
    table = events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60)
    host = events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    text = (f"{steps} steps, wall {wall:.3f} s, summed device (kernel) time {busy:.3f} s = {busy / wall:.0%} busy\n"
            + "\n".join(lines) + "\n" + table + "\nby host time:\n" + host)
    if trace and out is not None:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "experiments"))
        from trace_gaps import gap_report

        trace_path = out.with_suffix(".trace.json")
        prof.export_chrome_trace(str(trace_path))
        text = gap_report(trace_path) + "\n\n" + text
    print(text[:4000], flush=True)
    if out is not None:
        out.write_text(text)


class Timeline:
    """Host and GPU time of a step's phases, without the profiler's per-op overhead: each phase's host wall time,
    and its GPU span (CUDA events at its start and end: kernels plus the gaps where the GPU waited for the host).
    Patches the loop's functions for one run (``undo``); ``report`` averages over the steps after ``skip``."""

    PHASES = (("to_device", "qvl.train.batches", "to_device"),
              ("micro_step (forward + backward)", "qvl.train.distributed", "micro_step"),
              ("  LossModule.forward", "qvl.train.loop", "LossModule.forward"),
              ("    row_hidden", "qvl.train.row_forward", "row_hidden"),
              ("      decoder_stack (eager)", "qvl.train.graphs", "decoder_stack"),
              ("      DecoderGraphs (replay)", "qvl.train.graphs", "DecoderGraphs.__call__"),
              ("    backward graph (replay)", "qvl.train.graphs", "_Replay.backward"),
              ("finish_step (clip + optimizer)", "qvl.train.distributed", "finish_step"),
              ("host_read (waits for the GPU)", "qvl.train.host", "host_read"))

    def __init__(self):
        import importlib

        self.undo_list, self.rows, self.current = [], [], {}
        for label_, module_name, attr in self.PHASES:
            owner = importlib.import_module(module_name)
            if "." in attr:
                cls_name, attr = attr.split(".")
                owner = getattr(owner, cls_name)
            original = getattr(owner, attr)
            setattr(owner, attr, self._timed(label_, original))
            self.undo_list.append((owner, attr, original))
        self.step_start = None

    def _timed(self, label_, fn):
        def timed(*a, **k):
            if torch.cuda.is_current_stream_capturing():  # recording a CUDA graph: no events inside it
                return fn(*a, **k)
            start_ev, end_ev = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.perf_counter()
            start_ev.record()
            out = fn(*a, **k)
            end_ev.record()
            self.current.setdefault(label_, []).append((time.perf_counter() - t0, start_ev, end_ev))
            return out

        return timed

    def step_done(self, wall: float) -> None:
        torch.cuda.synchronize()
        row = {"step wall": (wall, wall)}
        for label_, calls in self.current.items():
            row[label_] = (sum(h for h, _, _ in calls), sum(a.elapsed_time(b) / 1e3 for _, a, b in calls))
        self.rows.append(row)
        self.current = {}

    def undo(self) -> None:
        for owner, attr, original in self.undo_list:
            setattr(owner, attr, original)

    def report(self, skip: int) -> str:
        rows = self.rows[skip:]
        if not rows:
            return ""
        labels = ["step wall"] + [p[0] for p in self.PHASES if any(p[0] in r for r in rows)]
        lines = [f"  {'phase':<36} {'host ms/step':>12} {'GPU span ms/step':>17}"]
        for lab in labels:
            host = sum(r.get(lab, (0, 0))[0] for r in rows) / len(rows) * 1e3
            gpu = sum(r.get(lab, (0, 0))[1] for r in rows) / len(rows) * 1e3
            lines.append(f"  {lab:<36} {host:12.1f} {gpu:17.1f}")
        # host time outside the phases: waiting for the DataLoader's next batch, packing, the callbacks
        top = [p[0] for p in self.PHASES if not p[0].startswith(" ")]
        outside = sum(r["step wall"][0] - sum(r.get(lab, (0, 0))[0] for lab in top) for r in rows) / len(rows)
        lines.append(f"  {'outside the phases (loader, packing)':<36} {outside * 1e3:12.1f}")
        return "\n".join(lines)


def label(module, name: str) -> None:
    """Run ``module``'s forward under a profiler range called ``name`` (for this process's remaining runs)."""
    forward = module.forward

    def labelled(*a, **k):
        with torch.profiler.record_function(name):
            return forward(*a, **k)

    module.forward = labelled


def run_loop(name, args, base, model_dir, registry, work: Path, flops_per_token, samples_per_step, warmup: int,
             timed: int, profile=None, **overrides) -> dict:
    """One qvl contestant: qvl.train.loop.train on the in-memory model (load_model patched to return it)."""
    import qvl.models.load as load_mod
    import qvl.train.checkpoint as ckpt_mod
    from qvl.train.loop import train

    import qvl.models.attention as attn_mod
    from qvl.train import compile, components, host

    levers_off = overrides.pop("levers_off", ())  # one lever switched off, to measure what it gives
    levers_on = overrides.pop("levers_on", ())  # a lever not in the loop yet, to measure what it would give
    warmup = overrides.pop("bench_warmup", warmup)
    cfg = loop_config(args, model_dir, registry, work / f"run-{name}", **overrides)
    profile_out = Path(args.profile_out) if args.profile_out else None
    if profile_out is not None and "," in args.profile_row:  # several rows profiled: one file each
        profile_out = profile_out.with_name(f"{profile_out.stem}_{name.replace('#', '_run')}{profile_out.suffix}")
    clock = StepClock(profile, profile_out)
    clock.trace = args.trace
    timeline = Timeline() if args.timeline and args.device.startswith("cuda") else None
    if timeline is not None:
        clock.timeline = timeline
    if profile:  # named ranges for the profile: the vision tower's forward and the loss head
        label(model_of(base).model.visual, "bench: vision tower")
    saved = (load_mod.load_model, ckpt_mod.save_final, attn_mod.use_vision_sdpa, components.lora_inputs_stay_16bit)
    load_mod.load_model = lambda *a, **k: base
    ckpt_mod.save_final = lambda *a, **k: []  # the servable folder at the end is not part of the throughput
    if "vision_sdpa" in levers_off:  # the vision tower's sdpa may pick cuDNN
        for m in base.modules():
            if type(m).__name__.endswith("VisionAttention"):
                m.config._attn_implementation = "sdpa"
        attn_mod.use_vision_sdpa = lambda model: False
    if "vision_varlen" in levers_off:  # the vision tower's sdpa per image instead of one varlen call per block
        original = saved[2]
        attn_mod.use_vision_sdpa = lambda model: original(model, varlen=False)
    if "lora_16bit" in levers_off:  # PEFT casts LoRA inputs to fp32
        components.lora_inputs_stay_16bit = lambda model: 0
    compile_vision_blocks, queue_host_read = compile.compile_vision_blocks, host.queue_host_read
    if "read_ahead" in levers_off:  # a step's numbers copied when read (behind the next step: it waits for that too)
        host.queue_host_read = lambda *values: (None, values, None)
    if "compile_vision" in levers_off:  # the frozen vision tower's blocks left eager
        compile.compile_vision_blocks = lambda model, **k: 0
    from qvl.models import tower_speed

    tower_saved = (tower_speed.linear_patch_embed, tower_speed.stored_rotary)
    if "tower_forward" in levers_off:  # the patch embedding as cuDNN's Conv3d, cos / sin recomputed per block
        tower_speed.linear_patch_embed = tower_speed.stored_rotary = lambda visual: False
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    import torch._inductor.config as inductor_config

    import torch._functorch.config as functorch_config

    cpp_wrapper, budget = inductor_config.cpp_wrapper, functorch_config.activation_memory_budget
    inductor_config.cpp_wrapper = "cpp_wrapper" in levers_on  # inductor's C++ wrapper: kernels launched from C++
    try:
        said: list[str] = []

        def log(line: str) -> None:
            said.append(line)
            print(f"  {name}: {line}", flush=True)

        result = train(cfg, log=log, callbacks=[clock])
    finally:
        if timeline is not None:
            timeline.undo()
            print(f"{name}: host and GPU time per step (steps {warmup}-{warmup + timed}):\n"
                  f"{timeline.report(warmup)}", flush=True)
        inductor_config.cpp_wrapper, functorch_config.activation_memory_budget = cpp_wrapper, budget
        compile.compile_vision_blocks, host.queue_host_read = compile_vision_blocks, queue_host_read
        tower_speed.linear_patch_embed, tower_speed.stored_rotary = tower_saved
        load_mod.load_model, ckpt_mod.save_final, attn_mod.use_vision_sdpa, components.lora_inputs_stay_16bit = saved
    cuda = args.device.startswith("cuda")
    res = clock.stats(warmup, warmup + timed, samples_per_step)
    res.update(peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
               peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
               losses=result.losses, final_loss_mean5=sum(result.losses[-5:]) / len(result.losses[-5:]),
               mfu=res["tokens_per_s"] * flops_per_token / (PEAK_TFLOPS * 1e12),
               settings={**overrides, "levers_off": list(levers_off), "levers_on": list(levers_on)})
    if overrides.get("compile_layers"):
        from torch._dynamo.utils import counters

        res["dynamo_unique_graphs"] = counters["stats"]["unique_graphs"]
    graph_lines = [line for line in said if line.startswith("cuda_graphs")]  # on / off and why, replays, recordings
    if graph_lines:
        res["cuda_graphs"] = graph_lines
    # each step's wall time (a step that records CUDA graphs, or compiles, stands out)
    res["step_times"] = [round(b[1] - a[1], 3) for a, b in zip(clock.marks, clock.marks[1:])]
    # and its useful tokens: the rate over any window can be computed again from the JSON
    res["step_tokens"] = [round(b[2] - a[2]) for a, b in zip(clock.marks, clock.marks[1:])]
    return res


def row_lengths(plan, encs, batch: int, warmup: int, timed: int, multiple: int, budget: int | None = None) -> str:
    """How many distinct padded row lengths (CUDA graph recordings) the warm-up and the timed steps meet; with
    ``budget`` (packed_row_tokens) each step's samples regrouped as the loop regroups them."""
    from qvl.data.packing import graph_row_length
    from qvl.train.batches import row_groups

    order = [i for epoch in range((warmup + timed) * batch // len(plan.epoch_order(0)) + 1)
             for i in plan.epoch_order(epoch)]
    steps = []  # per step: its rows' real token counts
    for k in range(warmup + timed):
        lengths = [len(encs[i]) for i in order[k * batch:(k + 1) * batch]]
        groups = row_groups(lengths, budget) if budget else [range(len(lengths))]
        steps.append([sum(lengths[i] for i in g) for g in groups])
    padded = [[graph_row_length(n, multiple) for n in step] for step in steps]
    seen_warm = {r for step in padded[:warmup] for r in step}
    new_in_timed = {r for step in padded[warmup:] for r in step if r not in seen_warm}
    padding = 1 - sum(map(sum, steps)) / sum(map(sum, padded))
    return (f"row lengths padded to multiples of {multiple}: {len({r for step in padded for r in step})} distinct, "
            f"{len(seen_warm)} in the warm-up, {len(new_in_timed)} first met in the timed steps (unless recorded "
            f"ahead); padding "
            f"{padding:.1%} of the tokens")


def ratio_to_fit(model, budget_gib: float, all_ckpt_peak_gib: float, longest_row: int, targets) -> float:
    """Selective checkpointing that fits ``budget_gib``: the planner's per-layer activations (kept when a layer
    is not recomputed) x the longest row, against what the all-recompute run left free."""
    from qvl.plan.memory import layer_saved_bytes_per_token
    from qvl.train import recompute

    shape = _shape_of(model)
    layer = layer_saved_bytes_per_token(shape, 64, targets) * longest_row
    free = (budget_gib - all_ckpt_peak_gib) * 2**30
    return recompute.ratio_for_memory(shape.layers, free, layer)


def _shape_of(model):
    import tempfile as _t

    from qvl.plan.model import from_config

    with _t.TemporaryDirectory() as d:
        model.config.save_pretrained(d)
        return from_config(Path(d) / "config.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8B", help="2B, 4B, 8B, 30B-A3B (random weights), tiny or tiny-moe")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--workload", choices=("mixed", "video"), default="mixed",
                    help="mixed: text, images and short videos; video: every sample a 8-16 frame clip of 4k-16k tokens "
                         "(run it with --samples 64 --batch 1 and the rows baseline-video,cli:lora_8b_video)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per contestant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=8, help="warm-up steps before the timed ones; 8, the compiled "
                    "rows' warm-up, so every contestant is timed on the same steps and samples, and the baseline's "
                    "one-off costs at its first shapes (up to 3 s a step on a fresh machine) stay out of its timing")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", default="", help="comma list of contestants to run")
    ap.add_argument("--in-order", action="store_true",  # also: "name#2" in --only runs a contestant again
                    help="run the qvl contestants in --only's order (default: the order they are listed here), to "
                         "check that a difference between two rows is not where they ran in the call")
    ap.add_argument("--ckpt-ratio", type=float, default=None,
                    help="gradient_checkpointing_ratio for the selective rows (default: fitted to the baseline's peak)")
    ap.add_argument("--margin-gib", type=float, default=0.75, help="kept free below the baseline's peak when fitting")
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds: skip contestants that would start later")
    ap.add_argument("--profile-out", default=None, help="write a torch.profiler summary of the best qvl row here")
    ap.add_argument("--profile-row", default="qvl-per-sample-keep10", help="the contestant --profile-out profiles")
    ap.add_argument("--profile-at", type=int, default=None, help="profile from this step (default: after "
                    "the timed ones; inside them, the profiler's overhead counts in the timing)")
    ap.add_argument("--profile-steps", type=int, default=2, help="how many steps to profile (the first one starts "
                    "behind the profiler's own start: more steps show the steady state)")
    ap.add_argument("--trace", action="store_true", help="with --profile-out: export the chrome trace and report "
                    "the GPU's idle gaps and what the host did in them (bench/experiments/trace_gaps.py)")
    ap.add_argument("--timeline", action="store_true", help="print each qvl row's host and GPU time per step phase "
                    "(CUDA events around the loop's functions; adds one sync per step)")
    ap.add_argument("--long-warmup", type=int, default=40, help="warm-up steps of the long-window rows "
                    "(qvl-auto-long, qvl-cudagraphs: CUDA graphs record once per row length)")
    ap.add_argument("--long-timed", type=int, default=40, help="timed steps of the long-window rows")
    ap.add_argument("--row-multiple", type=int, default=256, help="qvl-cudagraphs: cuda_graphs_row_multiple")
    ap.add_argument("--eager-kernels", action="store_true", help="CUDA_MODULE_LOADING=EAGER for the whole process "
                    "(every contestant): CUDA loads all kernels at start instead of at each one's first launch "
                    "(torch's default, lazy, which qvl train keeps); see bench/experiments/kernel_loading.py")
    ap.add_argument("--cli-steps", type=int, default=30, help="max_steps of the cli:* and recipe rows")
    ap.add_argument("--baseline-steps", type=int, default=None, help="optimizer steps of the YAML baselines "
                    "(baseline-yaml, -moe, -video, -qlora; default: --cli-steps), on the CLI rows' learning-rate "
                    "schedule: 30B-A3B's takes ~16 s a step, so 30 would cost it 8 minutes; losses are compared over "
                    "the steps both ran")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = ap.parse_args(argv)
    if args.baseline_steps is not None and args.baseline_steps <= train_cli.BASELINE_WARMUP:
        ap.error(f"--baseline-steps {args.baseline_steps}: the YAML baselines time the steps after their first "
                 f"{train_cli.BASELINE_WARMUP}, so give more")
    t_begin = time.time()
    cuda = args.device.startswith("cuda")
    if args.eager_kernels:  # read when CUDA starts: nothing before this line may use it
        os.environ["CUDA_MODULE_LOADING"] = "EAGER"

    torch.manual_seed(0)
    t0 = time.time()
    model, processor = build(args.model, args.device)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, built in "
          f"{time.time() - t0:.1f} s", flush=True)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    work = Path(tempfile.mkdtemp(prefix="qvl_bench_", dir=work_root(model_bytes)))
    print(f"work folder {work}", flush=True)
    # the CLI rows save the model here (16 GiB for 8B): removed at exit, also when `timeout` or the device's time
    # limit stops the bench (SIGTERM); three such folders filled a 64 GiB disk (H200, 2026-12-05)
    atexit.register(shutil.rmtree, work, True)
    runs = runs_folder(work, model_bytes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data = work / "workload"
    rows = (make_video_workload if args.workload == "video" else make_workload)(data, n=args.samples, seed=0)
    registry = work / "datasets.yaml"
    registry.write_text(f"workload:\n  annotation_path: {data / 'workload.jsonl'}\n  data_path: {data}\n")
    model_dir = work / "model"  # config + processor only: train() gets the in-memory weights (run_loop)
    model.config.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    budget = VisionBudget(**budget_keys(args))
    t0 = time.time()
    encs = [encode(parse_sample(r, i, data)[0], processor, budget) for i, r in enumerate(rows)]
    lengths = [len(e) for e in encs]
    print(f"encoded {len(encs)} samples in {time.time() - t0:.1f} s; tokens min {min(lengths)} mean "
          f"{sum(lengths) / len(lengths):.0f} max {max(lengths)}", flush=True)
    hist = histogram(lengths)
    for label, count in hist:
        print(f"  {label:>10}: {count}")

    # the loop's sample order (seeded permutation), so every contestant sees the same samples per step
    from qvl.train.batches import Plan
    from qvl.train.loop import Dist

    n_steps = args.warmup + args.steps
    plan = Plan(len(encs), loop_config(args, model_dir, registry, work / "x"), Dist())
    order = plan.epoch_order(0)
    groups = [[encs[i] for i in order[k * args.batch:(k + 1) * args.batch]] for k in range(n_steps)]
    groups = [g for g in groups if len(g) == args.batch]
    used = [len(e) for g in groups for e in g]
    longest_row = max(sum(len(e) for e in g) for g in groups)
    pad_id = processor.tokenizer.pad_token_id
    padded_slots = sum(max(len(e) for e in g) * len(g) for g in groups[args.warmup:])
    padding = 1 - sum(len(e) for g in groups[args.warmup:] for e in g) / max(1, padded_slots)

    only = set(filter(None, args.only.split(",")))
    results: dict = {}
    base = model
    qkvo_flops = None

    def want(name):
        if only and name not in only:
            return False
        if time.time() - t_begin > args.time_budget:
            results[name] = {"error": "skipped: time budget"}
            return False
        return True

    def finish(name, res, targets, ckpt, attn):
        res.update(targets=targets, gradient_checkpointing=ckpt, attention=attn)
        results[name] = res
        if cuda:
            torch.cuda.empty_cache()
        write(args, summary_of(args, results, encs, hist, padding))

    if want("baseline-full"):  # full fine-tuning of the LLM and the merger, as the official recipe's full runs
        torch.manual_seed(0)
        trained = [p for n, p in base.named_parameters() if "language_model" in n or ".merger" in n
                   or n.startswith("lm_head")]
        for p in trained:
            p.requires_grad_(True)
        set_checkpointing(base, True)
        full_flops = 1.5 * llm_flops_per_token(base, used)  # weight gradients too: 6 instead of 4 x params
        try:
            res = run("baseline-full", base, groups, step_padded, pad_id, args.device, args.warmup, full_flops)
        except torch.OutOfMemoryError as e:
            res = {"error": f"OOM: {str(e).splitlines()[0]}"}
        for p in trained:
            p.requires_grad_(False)
            p.grad = None
        set_checkpointing(base, False)
        finish("baseline-full", res, ["llm (full)", "merger (full)"], True, "sdpa (padded)")

    # baseline and flatten: plain transformers + peft steps (unchanged)
    for name, step_fn, attn in (("baseline", step_padded, None), ("flatten", step_flatten, "sdpa")):
        if not want(name):
            continue
        torch.manual_seed(0)
        peft_model = add_lora(base, QKVO)
        set_checkpointing(peft_model, True)
        qkvo_flops = llm_flops_per_token(peft_model, used)
        try:
            res = run(name, peft_model, groups, step_fn, pad_id, args.device, args.warmup, qkvo_flops, attn)
        except torch.OutOfMemoryError as e:
            res = {"error": f"OOM: {str(e).splitlines()[0]}"}
        base = peft_model.unload()
        set_checkpointing(base, False)
        use_packed_attention(base, "sdpa")
        finish(name, res, QKVO, True, attn or "sdpa (padded)")

    if qkvo_flops is None:  # counted on a LoRA-wrapped model, unwrapped again (the CLI rows save these weights)
        counted = add_lora(base, QKVO)
        qkvo_flops = llm_flops_per_token(counted, used)
        base = counted.unload()
    all_flops = qkvo_flops  # LoRA FLOPs are not counted: same model FLOPs for both target sets
    base_peak = (results.get("baseline") or {}).get("peak_gib")

    def fitted_ratio(targets) -> float:
        if args.ckpt_ratio is not None:
            return args.ckpt_ratio
        ref = (results.get("qvl-fused") or {}).get("peak_gib")
        if not (cuda and base_peak and ref):
            return 0.5
        return ratio_to_fit(model_of(base), base_peak - args.margin_gib, ref, longest_row, targets)

    # qvl: the real loop, levers added one at a time, then qvl's default targets; `auto` attention = sdpa here
    contestants = [
        ("qvl-fused", dict(compile_layers=False)),  # the loop with fused linear+CE and fused AdamW, all recomputed
        ("qvl-selective", dict(compile_layers=False, gradient_checkpointing_ratio="fit-qkvo")),
        # attention per sample inside the packed row, no L x L mask (one flash varlen call per layer on a GPU)
        ("qvl-per-sample", dict(compile_layers=False, gradient_checkpointing_ratio="fit-qkvo",
                                packed_attention="per_sample")),
        # the memory the mask and the masked-out attention took, spent on recomputing fewer layers
        ("qvl-per-sample-keep10", dict(compile_layers=False, gradient_checkpointing_ratio=26 / 36,
                                       packed_attention="per_sample")),
        ("qvl-keep10-cudnn-vision", dict(compile_layers=False, gradient_checkpointing_ratio=26 / 36,
                                         packed_attention="per_sample", levers_off=("vision_sdpa",))),
        ("qvl-keep10-lora-fp32-cast", dict(compile_layers=False, gradient_checkpointing_ratio=26 / 36,
                                           packed_attention="per_sample", levers_off=("lora_16bit",))),
        ("qvl-per-sample-keep12", dict(compile_layers=False, gradient_checkpointing_ratio=24 / 36,
                                       packed_attention="per_sample")),
        # + compile_layers (norms, MLPs, whole attention: per_sample takes its bounds as inputs), 8 warm-up steps
        ("qvl-keep10-compile", dict(compile_layers=True, gradient_checkpointing_ratio=26 / 36,
                                    packed_attention="per_sample", bench_warmup=8)),
        ("qvl-per-sample-keep14", dict(compile_layers=False, gradient_checkpointing_ratio=22 / 36,
                                       packed_attention="per_sample")),
        # compiled layers need less memory (fused elementwise): 4 more layers kept within the baseline's peak
        ("qvl-keep14-compile", dict(compile_layers=True, gradient_checkpointing_ratio=22 / 36,
                                    packed_attention="per_sample", bench_warmup=8)),
        # every layer kept (nothing recomputed): the compiled step's ceiling, and what it costs in memory
        ("qvl-nockpt-compile", dict(compile_layers=True, gradient_checkpointing_ratio=0.0,
                                    packed_attention="per_sample", bench_warmup=8)),
        # compile_scope=parts: each layer's norms, attention and MLP apart (LoRA and residual adds eager)
        ("qvl-auto-compile-parts", dict(compile_layers=True, compile_scope="parts", gradient_checkpointing_ratio="auto",
                                        packed_attention="per_sample", bench_warmup=8)),
        # the vision tower's attention per image (sdpa) instead of one varlen call per block
        ("qvl-auto-compile-vision-sdpa", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                              packed_attention="per_sample", bench_warmup=8,
                                              levers_off=("vision_varlen",))),
        # recomputed layers keep their attention half (selective activation checkpointing), all / auto layers
        ("qvl-all-mlp", dict(compile_layers=True, gradient_checkpointing_ratio=1.0, gradient_checkpointing_scope="mlp",
                             packed_attention="per_sample", bench_warmup=8)),
        ("qvl-auto-mlp", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                              gradient_checkpointing_scope="mlp", packed_attention="per_sample", bench_warmup=8)),
        ("qvl-auto-mlp-cpp", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                  gradient_checkpointing_scope="mlp", packed_attention="per_sample", bench_warmup=8,
                                  levers_on=("cpp_wrapper",))),
        # the loop's defaults with compile_layers on (whole decoder layers, recompute inside the compiled code)
        ("qvl-auto-compile", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                  packed_attention="per_sample", bench_warmup=8,
                                  gradient_checkpointing_scope="auto")),
        # the defaults with a step's samples regrouped into rows of up to N tokens (packed_row_tokens): shorter rows
        # keep less for backward, so gradient_checkpointing_ratio auto recomputes fewer layers (or none)
        *[(f"qvl-rows{n}", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                                 bench_warmup=8, gradient_checkpointing_scope="auto", packed_row_tokens=n))
          for n in (1536, 2048, 2560, 3072)],
        # the compiler's partitioner under a memory budget (activation_memory_budget) instead of, or with, layers
        # recomputed by checkpointing: it recomputes the cheapest work per byte first (elementwise, attention forward)
        *[(f"qvl-budget{round(b * 100)}-nockpt", dict(compile_layers=True, gradient_checkpointing_ratio=0.0,
                                                      packed_attention="per_sample", bench_warmup=8,
                                                      activation_memory_budget=b))
          for b in (0.95, 0.9, 0.8, 0.7)],
        # within the baseline's memory (8B, this workload's 4,608-token longest row): 32 layers kept under budget 0.8
        # (68.7 KB per token each with the key / value heads repeated, 76.6 grouped: bench/experiments/layer_memory.py),
        # 4 recomputed whole; gemm_row_multiple off, as measured
        # before auto became 128 on a GPU (2026-11-28; qvl-fit-b80-gemm128 is this row with it)
        ("qvl-fit-b80", dict(compile_layers=True, gradient_checkpointing_ratio=4 / 36, packed_attention="per_sample",
                             bench_warmup=8, activation_memory_budget=0.8, gemm_row_multiple=0)),
        # the defaults with rows padded to 128-token multiples for the CUDA graphs (half the padding, more recordings)
        ("qvl-pad128", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                            bench_warmup=8, cuda_graphs_row_multiple=128)),
        # the defaults with each step's numbers copied to the host when read, once the next step is queued (before
        # 2026-11-28): the read waits for the next step too, and the GPU idles while the host builds the one after
        ("qvl-read-late", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                               bench_warmup=8, levers_off=("read_ahead",))),
        # the defaults with 8 DataLoader workers instead of 4 (is the loader what a step waits for?)
        ("qvl-workers8", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                              bench_warmup=8, dataloader_num_workers=8)),
        # the defaults with the loss head's rows and the tower's patches rounded up (gemm_row_multiple; auto = 128 on a
        # GPU) off or coarser: with it the matmuls outside the CUDA graphs meet no new shape (a new one holds the host
        # until the GPU is idle)
        *[(f"qvl-gemm{m}", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                                bench_warmup=8, gemm_row_multiple=m)) for m in (0, 512)],
        # the within-memory row (qvl-fit-b80) with the same rounding
        *[(f"qvl-fit-b80-gemm{m}", dict(compile_layers=True, gradient_checkpointing_ratio=4 / 36,
                                        packed_attention="per_sample", bench_warmup=8, activation_memory_budget=0.8,
                                        gemm_row_multiple=m)) for m in (128, 512)],
        # within the baseline's memory with no layer recomputed whole: the embedding table in host memory
        # (host_embeddings, 1.16 GiB at 8B) pays for the 4 layers qvl-fit-b80 recomputes (~0.3 GiB each at 4,608 tokens)
        ("qvl-fit-host", dict(compile_layers=True, gradient_checkpointing_ratio=0.0, packed_attention="per_sample",
                              bench_warmup=8, activation_memory_budget=0.8, gemm_row_multiple=128,
                              host_embeddings=True)),
        # qvl-fit-host with the frozen tower's forward as before 2026-11-28: the patch embedding as cuDNN's Conv3d,
        # cos / sin recomputed inside every block's kernels
        ("qvl-fit-host-oldtower", dict(compile_layers=True, gradient_checkpointing_ratio=0.0,
                                       packed_attention="per_sample", bench_warmup=8, activation_memory_budget=0.8,
                                       gemm_row_multiple=128, host_embeddings=True, levers_off=("tower_forward",))),
        # the defaults with the frozen tower's forward as before 2026-11-28
        ("qvl-oldtower", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                              bench_warmup=8, levers_off=("tower_forward",))),
        # the previous defaults: 32 layers recomputing their MLP (gradient_checkpointing_scope mlp), 4 kept
        ("qvl-mlp-keep4", dict(compile_layers=True, gradient_checkpointing_ratio=32 / 36,
                               packed_attention="per_sample", bench_warmup=8, gradient_checkpointing_scope="mlp",
                               activation_memory_budget=None)),
        ("qvl-rows2048-nockpt", dict(compile_layers=True, gradient_checkpointing_ratio=0.0,
                                     packed_attention="per_sample", bench_warmup=8, packed_row_tokens=2048)),
        # the defaults without CUDA graphs (cuda_graphs auto is on for this job on an H100)
        ("qvl-graphs-off", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                packed_attention="per_sample", bench_warmup=8,
                                gradient_checkpointing_scope="auto", cuda_graphs=False)),
        ("qvl-auto-layer", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                packed_attention="per_sample", bench_warmup=8)),
        # the defaults with the frozen vision tower's blocks left eager (2026-11-27 measured the reverse row,
        # qvl-vision-compiled, before compiling them became the default)
        ("qvl-vision-eager", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                  packed_attention="per_sample", bench_warmup=8, gradient_checkpointing_scope="auto",
                                  levers_off=("compile_vision",))),
        # the defaults + CUDA graphs of the decoder stack (qvl.train.graphs), over the defaults' window: each new row
        # shape recorded in it costs about two more steps
        ("qvl-graphs", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                            gradient_checkpointing_scope="auto", cuda_graphs=True,
                            cuda_graphs_row_multiple=args.row_multiple, bench_warmup=8)),
        ("qvl-graphs-eager", dict(compile_layers=False, gradient_checkpointing_ratio="auto",
                                  packed_attention="per_sample", gradient_checkpointing_scope="auto", cuda_graphs=True,
                                  cuda_graphs_row_multiple=args.row_multiple, bench_warmup=8)),
        # CUDA graphs record once per row shape: timed over a long window after a long warm-up (a real run's
        # steady state), next to the defaults over the same window
        ("qvl-auto-long", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                               gradient_checkpointing_scope="auto", bench_warmup=args.long_warmup,
                               bench_timed=args.long_timed)),
        ("qvl-nographs-long", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                   packed_attention="per_sample", gradient_checkpointing_scope="auto",
                                   cuda_graphs=False, bench_warmup=args.long_warmup, bench_timed=args.long_timed)),
        ("qvl-nockpt-long", dict(compile_layers=True, gradient_checkpointing_ratio=0.0, packed_attention="per_sample",
                                 bench_warmup=args.long_warmup, bench_timed=args.long_timed)),
        ("qvl-cudagraphs-nockpt", dict(compile_layers=True, gradient_checkpointing_ratio=0.0,
                                       packed_attention="per_sample", cuda_graphs=True,
                                       cuda_graphs_row_multiple=args.row_multiple, bench_warmup=args.long_warmup,
                                       bench_timed=args.long_timed)),
        ("qvl-cudagraphs-budget", dict(compile_layers=True, gradient_checkpointing_ratio=0.0,
                                       packed_attention="per_sample", cuda_graphs=True, activation_memory_budget=0.5,
                                       cuda_graphs_row_multiple=args.row_multiple, bench_warmup=args.long_warmup,
                                       bench_timed=args.long_timed)),
        ("qvl-cudagraphs", dict(compile_layers=True, gradient_checkpointing_ratio="auto", packed_attention="per_sample",
                                gradient_checkpointing_scope="auto", cuda_graphs=True,
                                cuda_graphs_row_multiple=args.row_multiple, bench_warmup=args.long_warmup,
                                bench_timed=args.long_timed)),
        ("qvl-cudagraphs-128", dict(compile_layers=True, gradient_checkpointing_ratio="auto",
                                    packed_attention="per_sample", gradient_checkpointing_scope="auto",
                                    cuda_graphs=True, cuda_graphs_row_multiple=128, bench_warmup=args.long_warmup,
                                    bench_timed=args.long_timed)),
        # the loop's default: as few recomputed layers as the card allows (may use more memory than the baseline)
        ("qvl-auto", dict(compile_layers=False, gradient_checkpointing_ratio="auto", packed_attention="per_sample")),
        ("qvl-compile", dict(compile_layers=True, gradient_checkpointing_ratio="fit-qkvo")),
        ("qvl-all-linear", dict(compile_layers=False, lora_target_regex=None, gradient_checkpointing_ratio=30 / 36,
                                packed_attention="per_sample")),
        ("qvl-loop-plain", dict(fused_cross_entropy=False, optim="adamw_torch_foreach", compile_layers=False)),
        ("qvl-rows16k", dict(compile_layers=False, gradient_accumulation_steps=4, packed_row_tokens=16384,
                             packed_attention="per_sample",
                             max_steps=2 + max(4, args.steps // 4))),
    ]
    # "name#2" in --only runs contestant "name" again in this process (e.g. to see whether running first matters)
    known = dict(contestants)
    for again in [n for n in only if "#" in n and n.split("#")[0] in known]:
        contestants.append((again, dict(known[again.split("#")[0]])))
    profiled = set(args.profile_row.split(","))
    if args.in_order and only:
        listed = args.only.split(",")
        contestants.sort(key=lambda c: listed.index(c[0]) if c[0] in listed else len(listed))
    for name, overrides in contestants:
        if not want(name):
            continue
        ratio = overrides.get("gradient_checkpointing_ratio")
        if isinstance(ratio, str) and ratio.startswith("fit"):
            overrides = dict(overrides, gradient_checkpointing_ratio=fitted_ratio(
                ("q", "k", "v", "o") if ratio == "fit-qkvo" else ("q", "k", "v", "o", "gate", "up", "down")))
        warmup, timed = (2, overrides["max_steps"] - 2) if "max_steps" in overrides else (args.warmup, args.steps)
        if "bench_warmup" in overrides:  # more warm-up steps (compilation), the same number timed unless said
            warmup = overrides["bench_warmup"]
            timed = overrides.pop("bench_timed", timed)
            overrides = dict(overrides, max_steps=warmup + timed)
        if overrides.get("cuda_graphs", "auto") and cuda:
            lengths = row_lengths(plan, encs, args.batch, warmup, timed, overrides.get("cuda_graphs_row_multiple", 256),
                                  overrides.get("packed_row_tokens"))
            print(f"{name}: {lengths}", flush=True)
        per_step = args.batch * overrides.get("gradient_accumulation_steps", 1)
        profile = None
        if name in profiled and cuda and args.profile_out:
            at = args.profile_at if args.profile_at is not None else warmup + timed
            profile = (at, at + args.profile_steps)
            # more steps when after the timed ones
            overrides = dict(overrides, max_steps=max(warmup + timed, at + args.profile_steps))
        print(f"{name}: {overrides}", flush=True)
        torch.manual_seed(0)
        try:
            res = run_loop(name, args, base, model_dir, registry, work, all_flops, per_step, warmup, timed, profile,
                           **overrides)
        except torch.OutOfMemoryError as e:
            res = {"error": f"OOM: {str(e).splitlines()[0]}"}
        except Exception as e:  # a lever that breaks on this machine: recorded, the others still run
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        strip_adapters(base)
        targets = QKVO if overrides.get("lora_target_regex", QKVO_REGEX) else ALL_LINEAR
        finish(name, res, targets, overrides.get("gradient_checkpointing_ratio", 1.0),
               overrides.get("packed_attention", "auto (sdpa)"))

    # `qvl train` as a user runs it: the shipped YAMLs through the CLI, each in its own process (bench/train_cli.py)
    yaml_rows = YAML_ROWS
    cli_rows = [n for n in (args.only.split(",") if args.only else [])
                if n.startswith("cli:") or n == "recipe" or n.split("+")[0] in yaml_rows]
    if cli_rows:
        if any(n.split("+")[0] not in yaml_rows or n.startswith("baseline-qlora") for n in cli_rows):  # 4-bit load
            t0 = time.time()
            model_of(base).save_pretrained(model_dir)  # the weights the commands load, once
            print(f"saved the model's weights for the CLI rows in {time.time() - t0:.1f} s", flush=True)
        if cuda:
            torch.cuda.empty_cache()
        # transformers + peft on the YAML's own problem: the CLI rows' losses. "+key=value" on a baseline row: the
        # YAML with those settings (baseline-moe+lora_r=16, beside cli:lora_30b_a3b+lora_r=16)
        for name in [n for n in cli_rows if n.split("+")[0] in yaml_rows]:
            if not want(name):
                continue
            row, *sets = name.split("+")
            example = yaml_rows[row]
            torch.manual_seed(0)
            ref = qlora_base(base, model_dir, args.device, example) if row == "baseline-qlora" else base
            try:
                res = train_cli.yaml_baseline(ref, model_dir, registry, example, args.cli_steps, args.device,
                                              name=name, overrides=sets, stop_after=args.baseline_steps)
            except torch.OutOfMemoryError as e:
                res = {"error": f"OOM: {str(e).splitlines()[0]}"}
            if ref is not base:  # the 4-bit copy goes; the bench's own model comes back
                del ref
                model_of(base).to(args.device)
            res["mfu"] = res.get("tokens_per_s", 0.0) * all_flops / (PEAK_TFLOPS * 1e12)
            finish(name, res, [f"as {example}.yaml says"], True, "sdpa (padded)")
        if cuda and any(n.split("+")[0] not in yaml_rows for n in cli_rows):
            # each command loads its own copy, as a user's run has the card to itself: kept here, the 8B model's
            # 17.4 GiB left an H100's CLI row too little for its CUDA graphs' pools (out of memory at step ~50,
            # 2026-12-05)
            if want("baseline-liger") or host_has_room(model_bytes):
                model_of(base).to("cpu")
                print("the in-memory model moved to the CPU for the CLI rows", flush=True)
            else:  # nothing after the CLI rows needs it: a 30B-A3B copy in host memory beside one saved in /dev/shm
                model_of(base).to("meta")  # would not fit a 128 GiB machine
                print("the in-memory model freed for the CLI rows (no room for it in host memory)", flush=True)
            torch.cuda.empty_cache()
        for name in cli_rows:
            if name.split("+")[0] in yaml_rows or not want(name):
                continue
            spec, *sets = name[len("cli:"):].split("#")[0].split("+")  # "#2": the same row again; "+key=value"
            example, _, gpu = spec.partition("@")
            try:
                sets = [capped_at_baseline(s, example, sets, results) for s in sets]
            except ValueError as e:  # this row cannot run as asked; the rows after it still can
                finish(name, {"error": str(e)}, ["as the YAML says"], "as the YAML says", "as the YAML says")
                continue
            out = runs / ("run-" + name.replace(":", "-").replace("@", "-"))
            argv = (train_cli.recipe_command(model_dir, registry, out, args.cli_steps) if name == "recipe" else
                    train_cli.qvl_train_command(example, model_dir, registry, out, args.cli_steps) + sets)
            res = train_cli.run_command(name, argv, out, env={"QVL_GPU": gpu} if gpu else None)
            shutil.rmtree(out, ignore_errors=True)  # read into res; the next row needs the room (30B-A3B: ~38 GiB)
            full = example.startswith("full")
            res["mfu"] = res["tokens_per_s"] * all_flops * (1.5 if full else 1.0) / (PEAK_TFLOPS * 1e12)
            res["baseline_row"], res["loss_row"] = reference_rows(example, sets, results)
            finish(name, res, ["as the YAML says"], "as the YAML says", "as the YAML says")
            if res.get("stopped"):  # SIGTERM while it ran: its steps so far are written above
                sys.exit(143)

    # last: Liger patches transformers' Qwen3-VL rotary functions for the whole process, so no row may follow it
    if want("baseline-liger"):
        res = liger_baseline(base, groups, pad_id, args, qkvo_flops)
        finish("baseline-liger", res, QKVO, True, "sdpa (padded), Liger kernels")

    summary = summary_of(args, results, encs, hist, padding)
    print_table(summary)
    write(args, summary)


# transformers + peft in-process on an example YAML's own learning problem
YAML_ROWS = {"baseline-yaml": "lora_8b_24gb", "baseline-moe": "lora_30b_a3b", "baseline-video": "lora_8b_video",
             "baseline-qlora": "qlora_32b_24gb"}


def last5_loss_ratio(losses, ref_losses) -> float | None:
    """The mean loss of the last five steps both runs trained over the reference's, minus 1: a row stopped early is
    compared at its own last steps (the baselines train the CLI rows' samples in their order: step i is step i)."""
    n = min(len(losses or ()), len(ref_losses or ()))
    if not n:
        return None
    mine, theirs = losses[:n][-5:], ref_losses[:n][-5:]
    return sum(mine) / sum(theirs) - 1


def capped_at_baseline(setting: str, example: str, sets: list[str], results: dict) -> str:
    """``gpu_mem=baseline`` -> ``gpu_mem=<the card the baseline the row is compared with used, this call>``: the
    CLI row trains within the memory its baseline held ("at no more memory"), its recompute and preflight planning
    for that card. ``gpu_mem`` is a whole card (the CUDA context included, torch capped at the rest), so the
    baseline's card is what its allocator reserved plus the context. Other settings unchanged; ValueError when the
    baseline did not run or did not record its reserved memory."""
    from qvl.plan.memory import CUDA_CONTEXT_GIB

    if setting != "gpu_mem=baseline":
        return setting
    speed, _ = reference_rows(example, [s for s in sets if s != setting], results)
    reserved = results.get(speed, {}).get("peak_reserved_gib")
    if not reserved:
        raise ValueError(f"gpu_mem=baseline: the row's baseline {speed} did not run in this call, or recorded no "
                         "reserved memory (no card to cap at)")
    return f"gpu_mem={math.ceil((reserved + CUDA_CONTEXT_GIB) * 10) / 10}GiB"


def reference_rows(example: str, sets: list[str], results: dict) -> tuple[str, str | None]:
    """(speed row, loss row) a CLI row of ``example`` with ``sets`` (its "+key=value" overrides) compares with.
    Speed: transformers + peft on the YAML's own problem where the YAML has such a baseline and it ran (video: batch
    1, the same samples; QLoRA: + bitsandbytes; MoE: peft's target_parameters on the experts), with the row's own
    settings where that ran: the one whose overrides are the most of the row's (baseline-moe+lora_r=16 for
    cli:lora_30b_a3b+lora_r=16+packed_row_tokens=null; a speed lever is not the problem's); else `baseline` (full
    fine-tuning: `baseline-full`). Losses only against a baseline training what the YAML trains: `baseline` adapts
    q/k/v/o at 4 samples a step, so its loss says nothing of the YAML's (-9 % "vs baseline" on 2026-12-06 was that
    difference)."""
    full = example.startswith("full")
    speed = "baseline-full" if full else "baseline"
    loss = "baseline-full" if full else "baseline-yaml" if "baseline-yaml" in results else None
    for row in ("baseline-video", "baseline-qlora", "baseline-moe"):
        ran = [name for name, res in results.items() if "tokens_per_s" in res and name.split("+")[0] == row
               and set(name.split("+")[1:]) <= set(sets)]
        if example == YAML_ROWS[row] and ran:
            speed = loss = max(ran, key=lambda name: len(name.split("+")))
    return speed, loss


def qlora_base(base, model_dir: Path, device: str, example: str):
    """The base of baseline-qlora, loaded as transformers + peft + bitsandbytes users load it: from the saved weights
    with NF4, double quantisation and bf16 compute, what the example's ``quantization_targets`` quantise (the vision
    tower, merger included, in bf16 unless named; lm_head in bf16 as qvl keeps it), no fp32 upcast of the rest
    (prepare_model_for_kbit_training's, which would only add memory). The bench's 16-bit model waits on the CPU
    meanwhile, so the row's peak memory is its own."""
    from transformers import BitsAndBytesConfig

    from qvl.models.load import model_class, read_config
    from qvl.train.config import load_config

    targets = set(load_config(Path(__file__).resolve().parents[1] / "examples" / f"{example}.yaml").quantization_targets)
    skip = ["lm_head"] + ([] if "vision" in targets else ["model.visual"])
    if "vision" in targets and "merger" not in targets:
        skip += ["model.visual.merger", "model.visual.deepstack_merger_list"]

    model_of(base).to("cpu")
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
    t0 = time.time()
    model = model_class(read_config(model_dir)["model_type"]).from_pretrained(
        model_dir, dtype=torch.bfloat16, quantization_config=quant, device_map={"": device})
    print(f"baseline-qlora: loaded {model_dir} in NF4 in {time.time() - t0:.1f} s", flush=True)
    return model


def liger_baseline(base, groups, pad_id, args, flops_per_token) -> dict:
    """The baseline with Liger's kernels for Qwen3-VL (RoPE, RMSNorm, fused linear + cross-entropy): what TRL or
    LLaMA-Factory users get with ``use_liger_kernel``. Same LoRA, batches, checkpointing and optimizer."""
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen3_vl
    except ImportError:
        return {"error": "skipped: liger-kernel is not installed (pip install liger-kernel)"}
    apply_liger_kernel_to_qwen3_vl(model=model_of(base))
    torch.manual_seed(0)
    peft_model = add_lora(base, QKVO)
    set_checkpointing(peft_model, True)
    try:
        return run("baseline-liger", peft_model, groups, step_padded, pad_id, args.device, args.warmup,
                   flops_per_token)
    except torch.OutOfMemoryError as e:
        return {"error": f"OOM: {str(e).splitlines()[0]}"}
    finally:
        peft_model.unload()


def model_of(m):
    return m.get_base_model() if hasattr(m, "get_base_model") else m


def run_outputs(model_bytes: int) -> int:
    """Room a CLI row's run takes (each row's folder goes once it is read): its last step's checkpoint and the
    trained model. A 30B-A3B LoRA run with the experts' adapters (2.57 B fp32 params) writes a 28.7 GiB checkpoint and
    a 9.6 GiB model, two thirds of its 58 GiB model; a run on the disk its saved model had nearly filled stopped at
    qvl train's disk check (H100, 2026-12-06, bench/results/train_moe_h100.json). Full fine-tuning writes more (a
    checkpoint ~3x the model): the rows that run it here are of small models."""
    return model_bytes * 2 // 3


def work_root(model_bytes: int, spare: int = 4 * 2**30) -> str | None:
    """Where the bench's work folder goes: the temp folder, or /dev/shm (memory) when only that has room for the
    saved model the CLI rows load and their runs (30B-A3B: 58 GiB; a one-GPU machine here has a 64 GiB disk and
    128 GiB of memory). None: the temp folder."""
    need = model_bytes + run_outputs(model_bytes) + spare
    tmp = tempfile.gettempdir()
    if shutil.disk_usage(tmp).free >= need or not os.path.isdir("/dev/shm"):
        return None
    return "/dev/shm" if shutil.disk_usage("/dev/shm").free >= model_bytes + spare else None


def runs_folder(work: Path, model_bytes: int, spare: int = 4 * 2**30) -> Path:
    """Where the CLI rows write their runs: the work folder, or the temp folder's disk when the work folder went to
    /dev/shm and that disk has room for a run (memory is kept for the saved model and the runs' processes)."""
    tmp = tempfile.gettempdir()
    if str(work).startswith("/dev/shm") and shutil.disk_usage(tmp).free >= run_outputs(model_bytes) + spare:
        runs = Path(tempfile.mkdtemp(prefix="qvl_bench_runs_", dir=tmp))
        atexit.register(shutil.rmtree, runs, True)
        return runs
    return work


def host_has_room(nbytes: int, spare: int = 16 * 2**30) -> bool:
    """Whether host memory has ``nbytes`` and ``spare`` more available (/proc/meminfo; True where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 >= nbytes + spare
    except OSError:
        pass
    return True


def summary_of(args, results, encs, hist, padding) -> dict:
    import transformers

    cuda = args.device.startswith("cuda")
    summary = {
        "card": torch.cuda.get_device_name() if cuda else "cpu", "model": args.model, "torch": torch.__version__,
        "transformers": transformers.__version__, "qvl_src_tree": source_tree(), "samples_in_workload": len(encs),
        "steps": args.steps,
        "warmup": args.warmup, "batch": args.batch, "length_histogram": hist, "padding_fraction_baseline": padding,
        "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:]), "contestants": results,
    }
    base = results.get("baseline", {})
    if "tokens_per_s" in base:
        summary["baseline"] = {k: base.get(k) for k in ("tokens_per_s", "peak_gib")}
        # best qvl row for the same learning problem (q/k/v/o, 4 samples per step) within the baseline's memory
        same = [(n, r) for n, r in results.items() if n.startswith("qvl") and "tokens_per_s" in r
                and n not in ("qvl-all-linear", "qvl-rows16k")
                and (r.get("peak_gib") is None or base.get("peak_gib") is None or r["peak_gib"] <= base["peak_gib"])]
        if same:
            name, best = max(same, key=lambda nr: nr[1]["tokens_per_s"])
            summary["qvl"] = {"row": name, **{k: best.get(k) for k in ("tokens_per_s", "peak_gib", "mfu")}}
            summary["speedup"] = best["tokens_per_s"] / base["tokens_per_s"]
        # qvl's defaults whatever their memory (an 80 GB card: auto plans for the card, not for the baseline's peak)
        defaults = next(((n, r) for n, r in results.items() if n in ("qvl-auto-compile", "qvl-auto-long")
                         and "tokens_per_s" in r), None)
        if defaults:
            name, r = defaults
            summary["qvl_defaults"] = {"row": name, **{k: r.get(k) for k in ("tokens_per_s", "peak_gib", "mfu")},
                                       "speedup": r["tokens_per_s"] / base["tokens_per_s"]}
    cli = {}
    for name, r in results.items():  # the user's path: each CLI row against its baseline from this call
        ref = results.get(r.get("baseline_row", ""), {})
        loss_ref = results.get(r.get("loss_row", ""), {})
        if r.get("tokens_per_s") and ref.get("tokens_per_s"):
            cli[name] = {"vs": r["baseline_row"], "speedup": r["tokens_per_s"] / ref["tokens_per_s"],
                         "time_to_first_step_s": r.get("time_to_first_step_s"), "peak_gib": r.get("peak_gib"),
                         "peak_reserved_gib": r.get("peak_reserved_gib"), "loss_vs": r["loss_row"],
                         "loss_last5_vs_baseline": last5_loss_ratio(r.get("losses"), loss_ref.get("losses"))}
    if cli:
        summary["cli"] = cli
    ref = results.get("qvl-selective", {}).get("losses")
    if ref:  # the same samples per step: a lever that changes the maths shows here (bf16 noise ~1e-2)
        summary["max_abs_loss_diff_vs_qvl_selective"] = {
            n: max(abs(a - b) for a, b in zip(r["losses"], ref)) for n, r in results.items()
            if n.startswith("qvl") and r.get("losses") and n not in ("qvl-all-linear", "qvl-rows16k")}
    return summary


def print_table(summary: dict) -> None:
    print(f"\ncard {summary['card']}, model {summary['model']}, {summary['steps']} timed steps x {summary['batch']} "
          f"samples after {summary['warmup']} warm-up; baseline padding {summary['padding_fraction_baseline']:.1%}")
    print(f"{'contestant':<16}{'tok/s':>9}{'samples/s':>11}{'step s':>8}{'peak GiB':>10}{'reserved':>10}{'MFU':>7}"
          f"{'loss(last5)':>13}  ckpt")
    for name, r in summary["contestants"].items():
        if "error" in r:
            print(f"{name:<16} {r['error']}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        res = f"{r['peak_reserved_gib']:.1f}" if r.get("peak_reserved_gib") is not None else "-"
        if "time_to_first_step_s" in r:  # a CLI row: its own columns follow the table
            continue
        nan = float("nan")
        print(f"{name:<16}{r['tokens_per_s']:>9.0f}{r.get('samples_per_s', nan):>11.2f}{r.get('step_s', nan):>8.3f}"
              f"{peak:>10}{res:>10}"
              f"{r['mfu']:>7.1%}{r['final_loss_mean5']:>13.4f}  {r.get('gradient_checkpointing')}")
    for name, r in summary["contestants"].items():  # the CLI rows, with or without a baseline in this call
        if "time_to_first_step_s" not in r or "error" in r:
            continue
        c = summary.get("cli", {}).get(name)
        first = r.get("time_to_first_step_s")
        vs = f"{c['speedup']:.2f}x {c['vs']}" if c else "no baseline timed in this call"
        loss_vs = (f" ({c['loss_last5_vs_baseline']:+.2%} vs {c['loss_vs']})"
                   if c and c["loss_last5_vs_baseline"] is not None else "")
        print(f"{name:<28} steady {r['tokens_per_s']:>7.0f} tok/s ({vs}), whole run "
              f"{r.get('whole_run_tokens_per_s', 0):.0f} tok/s, after step 1 {r.get('after_first_tokens_per_s') or 0:.0f} "
              f"tok/s, first step at {first if first is None else round(first)} s, "
              f"peak {r.get('peak_gib') or 0:.1f} GiB (reserved {r.get('peak_reserved_gib') or 0:.1f}), "
              f"MFU {r['mfu']:.1%}, loss last5 {r['final_loss_mean5']:.4f}{loss_vs}")
    if "speedup" in summary:
        print(f"speedup ({summary['qvl']['row']}, the baseline's targets, within its memory, vs baseline): "
              f"{summary['speedup']:.2f}x")


def write(args, summary: dict) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
