"""`qvl train` measured the way a user runs it: the shipped YAML through the CLI, in its own process.

``bench/train_throughput.py`` runs these rows beside its baseline (contestants ``cli:<example>``, ``cli:<example>@<gpu>``
and ``recipe``): the example YAML as shipped, with only the model and data paths and ``max_steps`` changed, started
as a subprocess. What is reported comes from outside the loop: the time from the command's start to the line that
says the first optimizer step finished, and, from the run's ``metrics.jsonl`` (a row per step, wall time and tokens),
the steady rate over the steps that compiled or recorded nothing (``warm_up`` empty) and the whole run's rate with
its warm-up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# the official one-card LoRA recipe (qwen-vl-finetune's sft script flags), with lora_8b_24gb.yaml's batch settings
RECIPE_FLAGS = ["--deepspeed", str(REPO / "examples/deepspeed/zero2.json"), "--data_flatten", "True",
                "--lora_enable", "True", "--lora_r", "64", "--lora_alpha", "128", "--lora_dropout", "0.05", "--bf16",
                "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "8",
                "--model_max_length", "4096", "--gradient_checkpointing", "True", "--learning_rate", "1e-4",
                "--weight_decay", "0", "--warmup_ratio", "0.03", "--lr_scheduler_type", "cosine",
                "--max_pixels", "655360", "--min_pixels", "65536", "--eval_strategy", "no",
                "--save_strategy", "steps", "--save_steps", "1000", "--logging_steps", "1", "--report_to", "none"]


def qvl_train_command(example: str, model_dir: Path, registry: Path, out: Path, steps: int) -> list[str]:
    """``qvl train examples/EXAMPLE.yaml`` with the model, data, output folder and max_steps changed, nothing else."""
    return [sys.executable, "-c", "from qvl.cli.main import app; app()", "train", str(REPO / "examples" /
            f"{example}.yaml"), f"model_name_or_path={model_dir}", f"dataset_registry={registry}",
            "dataset_use=workload", f"output_dir={out}", f"max_steps={steps}", "resume=false"]


def recipe_command(model_dir: Path, registry: Path, out: Path, steps: int) -> list[str]:
    """The reference's one-card LoRA command line, torchrun and DeepSpeed's ZeRO-2 JSON included."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "qvl.train", *RECIPE_FLAGS,
            "--model_name_or_path", str(model_dir), "--dataset_registry", str(registry), "--dataset_use", "workload",
            "--output_dir", str(out), "--max_steps", str(steps)]


def run_command(name: str, argv: list[str], out: Path, env: dict | None = None, timeout: float = 900) -> dict:
    """Run ``argv`` (a training command writing to ``out``), echo its lines with the seconds since its start, and
    measure it: time to the first optimizer step, steady and whole-run tok/s, peak memory, losses."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    # a session of its own: a kill reaches torchrun's workers too, not only the launcher
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    stopped = False
    try:
        for line in proc.stdout:
            lines.append((time.time() - t0, line.rstrip()))
            print(f"  {name} {lines[-1][0]:7.1f}s | {lines[-1][1]}", flush=True)
            if time.time() - t0 > timeout:
                _kill(proc)
                break
        rc = proc.wait()
    except SystemExit:  # the bench was stopped (SIGTERM: `timeout`, the device's limit): the steps so far count
        stopped, rc = True, None
    finally:
        if proc.poll() is None:
            _kill(proc)
    res = measure(lines, read_rows(out / "metrics.jsonl"), t0)
    if stopped:  # the caller writes its results, then exits (a 30-step row cut at step 27 lost every number before)
        res["stopped"] = True
    times = out / "compile_times.json"  # torch.compile's seconds by phase (qvl.train.compile.phase_seconds)
    if times.is_file():
        res["compile_times"] = json.loads(times.read_text())
    profile = out / "profile.txt"  # profile_steps (a "+profile_steps=12-13" row): kept, as the work folder goes
    if profile.is_file():
        res["profile"] = profile.read_text().splitlines()[:80]
    res.update(rc=rc, command=" ".join(argv), env={k: v for k, v in (env or {}).items() if k.startswith("QVL_")})
    if stopped:
        res["error"] = f"stopped from outside after {res['steps']} steps: the numbers are those steps'"
    elif rc != 0:
        res["error"] = f"exit code {rc}: " + " / ".join(text for _, text in lines[-3:])[:400]
    return res


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measure(lines: list[tuple[float, str]], rows: list[dict], t0: float) -> dict:
    """The numbers of one run: ``lines`` its output as (seconds since start, text), ``rows`` its metrics.jsonl,
    ``t0`` its start (unix time). Steady tok/s: tokens over the time of the steps whose row has no ``warm_up`` (a
    row's ``step_s``: on CUDA the GPU's time between step ends; older rows without it, the time since the previous
    row); whole run: every step's tokens over the time from the start."""
    first = next((t for t, text in lines if text.startswith("first step done")), None)
    steady_tokens = steady_s = after_tokens = after_s = 0.0
    steady_steps = warm_steps = 0
    for prev, row in zip(rows, rows[1:]):
        seconds = row["step_s"] if row.get("step_s") is not None else row["time"] - prev["time"]
        if "profiled" not in (row.get("warm_up") or ""):  # the profiler's own cost is no step's
            after_tokens, after_s = after_tokens + row["tokens"] - prev["tokens"], after_s + seconds
        if row.get("warm_up"):
            warm_steps += 1
            continue
        steady_tokens += row["tokens"] - prev["tokens"]
        steady_s += seconds
        steady_steps += 1
    res = {"time_to_first_step_s": first, "steps": len(rows), "steady_steps": steady_steps,
           "warm_up_steps": warm_steps + (1 if rows else 0),
           "tokens_per_s": steady_tokens / steady_s if steady_s else 0.0,
           # every step after the first, warm-up ones included: where new shapes keep coming (eager MoE rows meet
           # a new matmul shape for many steps) the steady rate has few steps or none
           "after_first_tokens_per_s": after_tokens / after_s if after_s else 0.0,
           "step_s": steady_s / steady_steps if steady_steps else None,
           "peak_gib": max((r.get("peak_mem_gib") or 0 for r in rows), default=None),
           "peak_reserved_gib": max((r.get("peak_reserved_gib") or 0 for r in rows), default=None),
           "losses": [r["loss"] for r in rows]}
    if rows:
        res["wall_s"] = rows[-1]["time"] - t0
        res["whole_run_tokens_per_s"] = rows[-1]["tokens"] / res["wall_s"]
        res["final_loss_mean5"] = sum(res["losses"][-5:]) / len(res["losses"][-5:])
        res["warm_up_notes"] = [f"step {r['step']}: {r['warm_up']}" for r in rows if r.get("warm_up")]
    res["start_up"] = [text for _, text in lines if text.startswith(("first step", "warming up", "cuda_graphs",
                                                                      "compile_layers", "gradient checkpointing",
                                                                      "memory preflight", "GPU memory capped",
                                                                      "deepspeed=", "data_flatten", "MoE experts",
                                                                      "packed_row_tokens"))]
    return res


BASELINE_WARMUP = 3  # a YAML baseline's steps not timed


def yaml_baseline(base, model_dir: Path, registry: Path, example: str, steps: int, device: str,
                  warmup: int = BASELINE_WARMUP,
                  name: str = "baseline-yaml", overrides=(), stop_after: int | None = None):
    """transformers + peft on the example YAML's own learning problem, padded, on the samples and in the order its
    CLI row trains them: the YAML's seed, batch, accumulation, LoRA (targets, rank, alpha, dropout), learning-rate
    schedule, clipping, vision budget, optimizer and adapter precision; the loss token-weighted over the step's
    micro-batches as qvl's. The reference for the CLI row's losses (and a second speed reference). ``base``: the
    bench's in-memory model. A MoE model's experts get LoRA as the YAML gives them to qvl (``lora_experts``): peft's
    ``target_parameters``. ``overrides``: ``key=value`` settings over the YAML's, as `qvl train` takes them.
    ``stop_after``: train only this many of the ``steps`` (the learning-rate schedule stays that of ``steps``, the CLI
    row's, so the losses of the steps both ran compare)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qvl.data.collate import collate
    from qvl.data.preprocess import IGNORE_INDEX, TooLong, encode
    from qvl.data.samples import parse_sample
    from qvl.train.components import expert_targets, lora_regex
    from qvl.train import optimizers
    from qvl.train.config import load_config, parse_overrides
    from qvl.train.batches import Plan
    from qvl.train.loop import Dist, _load_data

    cfg = load_config(REPO / "examples" / f"{example}.yaml",
                      {**parse_overrides(list(overrides))[1], "model_name_or_path": str(model_dir),
                       "dataset_registry": str(registry), "dataset_use": "workload", "max_steps": steps})
    from qvl.models.load import load_processor

    processor = load_processor(str(model_dir))
    records = _load_data(cfg)
    plan = Plan(len(records), cfg, Dist())

    def encoded(i):
        sample, _ = parse_sample(records[i].raw, records[i].index, records[i].data_path, records[i].origin)
        try:
            return encode(sample, processor, cfg.vision_budget(), cfg.model_max_length)
        except TooLong:
            return None

    experts = expert_targets(base, cfg)
    model = get_peft_model(base, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                            target_modules=lora_regex(cfg),
                                            **({"target_parameters": experts} if experts else {})))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # fp32 adapters, as peft + the Trainer keep them (and qvl), bf16 where the YAML says so
        p.data = p.data.to(torch.bfloat16 if cfg.master_weights == "bf16" else torch.float32)
    if optimizers.is_8bit(cfg.optim):  # the Trainer's adamw_bnb_8bit / paged_adamw_8bit: bitsandbytes' own class
        import bitsandbytes as bnb

        opt = getattr(bnb.optim, optimizers.EIGHT_BIT[cfg.optim])(params, lr=cfg.learning_rate,
                                                                   weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, optimizers.lr_lambda(cfg, plan.total_steps))
    pad = processor.tokenizer.pad_token_id
    losses, tokens, seconds = [], 0, 0.0
    model.train()
    if device.startswith("cuda"):  # this row's peak (the weights included), not the process's so far
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(min(plan.total_steps, stop_after or plan.total_steps)):
            epoch, positions = plan.step_micro(step)
            order = plan.epoch_order(epoch)
            micro = [[e for e in (encoded(i) for i in plan.micro_batch(epoch, j, order)) if e is not None]
                     for j in positions]
            batches = [collate(m, pad) for m in micro if m]
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step_loss = 0.0
            for b in batches:
                b = {k: v.to(device) for k, v in b.items()}
                with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda")):
                    out = model(**b, use_cache=False)
                share = int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) / max(n_labels, 1)
                (out.loss * share).backward()  # the micro-batch's mean, weighted by its share of the label tokens
                step_loss += out.loss.item() * share
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            losses.append(step_loss)
            if step >= warmup:
                seconds += time.perf_counter() - t0
                tokens += sum(int(b["attention_mask"].sum()) for b in batches)
            print(f"  {name} step {step + 1}: loss {step_loss:.4f}", flush=True)
    finally:
        model.unload()
        base.gradient_checkpointing_disable()
    return {"tokens_per_s": tokens / seconds if seconds else 0.0, "losses": losses,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else None,
            "final_loss_mean5": sum(losses[-5:]) / len(losses[-5:]), "timed_steps": max(0, len(losses) - warmup),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
            "settings": f"{example}.yaml's LoRA, batch, schedule and vision budget"
                        + (f" with {' '.join(overrides)}" if overrides else "") + "; padded; transformers + peft"}
