"""Preflight checks that `qvl serve` and `qvl train` call before loading anything.

Both return a :class:`Preflight`: the plan, whether to go ahead, a one-line message and the settings to
use (serve with vLLM lowers ``max_model_len`` to the largest context that fits).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qvl.errors import QvlError
from qvl.plan.gpus import Gpu, detect_gpu, gpu_from_args
from qvl.plan.memory import Plan, plan_serve, plan_train
from qvl.plan.model import ModelShape, resolve_model
from qvl.plan.vllm import installed_vllm_version

MIN_CONTEXT = 4096  # below this a Qwen3-VL server cannot take one large image and an answer


@dataclass
class Preflight:
    ok: bool  # go ahead (possibly with `settings` changed)
    message: str  # one line for the log
    plan: Plan | None  # None when no GPU is known
    settings: dict = field(default_factory=dict)  # what to use: e.g. {"max_model_len": 61440}

    def raise_if_not_ok(self, force: bool = False) -> None:
        """Stop with a QvlError (the numbers and the fix) unless ok or forced."""
        if self.ok or force:
            return
        fix = next((r.text for r in (self.plan.recommendations if self.plan else []) if r.fits), None)
        raise QvlError(self.message.removeprefix("memory preflight: "), where="memory preflight",
                       fix=(fix + "; or pass --force to try anyway") if fix else "pass --force to try anyway")


def model_for_plan(name_or_path: str):
    """A ModelShape for a size, hub id, checkpoint folder or LoRA output folder; None when unknown."""
    p = Path(str(name_or_path)).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and (p / "adapter_config.json").is_file():
        base = json.loads((p / "adapter_config.json").read_text()).get("base_model_name_or_path")
        return model_for_plan(base) if base else None
    try:
        return resolve_model(str(name_or_path))
    except QvlError:
        pass
    name = str(name_or_path)
    if name.count("/") == 1 and not p.exists():  # a hub id the size table does not know: its cached config
        try:
            from huggingface_hub import snapshot_download

            return resolve_model(Path(snapshot_download(name, local_files_only=True)))
        except Exception:  # noqa: BLE001 - not cached: no plan, not an error
            return None
    return None


def _card(gpu: str | None, gpu_mem) -> Gpu | None:
    if gpu or gpu_mem is not None:
        return gpu_from_args(gpu, gpu_mem)
    return detect_gpu()


def preflight_serve(model, *, gpu: str | None = None, gpu_mem=None, backend: str = "vllm",
                    max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                    max_num_seqs: int | None = None, image_tokens: int | None = None, video_frames: int = 0,
                    kv_cache_dtype: str = "auto", enforce_eager: bool = False, gpus: int = 1,
                    vllm_version: str | None = None) -> Preflight:
    """Check a serve setting. With vLLM and no (or a too large) max_model_len, pick the largest that fits.

    ``model``: a size, hub id, checkpoint folder / config.json, or a resolved ModelShape.
    ``gpu``/``gpu_mem`` name the card; both None: detect CUDA device 0 (no CUDA: skip the check, ok=True).
    ``vllm_version``: whose KV accounting to reproduce; None: the installed vLLM's (the newest when none is).
    """
    card = _card(gpu, gpu_mem)
    if card is None:
        return Preflight(True, "memory preflight skipped: no CUDA device", None, {})
    m = model if isinstance(model, ModelShape) else resolve_model(model)
    if backend == "vllm" and vllm_version is None:
        vllm_version = installed_vllm_version()
    kw = dict(backend=backend, gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
              image_tokens=image_tokens, video_frames=video_frames, kv_cache_dtype=kv_cache_dtype,
              enforce_eager=enforce_eager, gpus=gpus, vllm_version=vllm_version)
    plan = plan_serve(m.name, _shape=m, _gpu=card, max_model_len=max_model_len, **kw)
    asked = plan.settings["max_model_len"]
    if plan.fits:
        kv = f"KV {plan.kv_estimate} available" if plan.kv_available_gib is not None else \
            f"{plan.total_gib:.1f} GiB of {card.total_gib:.1f} GiB"
        return Preflight(True, f"max_model_len {asked:,} fits on {card.name} ({kv})", plan,
                         {"max_model_len": asked})
    best = min(plan.max_model_len_that_fits or 0, asked)  # never more context than was asked for
    best = best // 1024 * 1024 if best >= 1024 else best
    if MIN_CONTEXT <= best < asked:
        chosen = plan_serve(m.name, _shape=m, _gpu=card, max_model_len=best, **kw)
        if chosen.fits:  # a shorter context only helps when the KV cache was what did not fit
            kv_gib = chosen.kv_needed_gib
            msg = f"max_model_len {asked:,} does not fit; using {best:,} (KV {kv_gib:.1f} GiB)"
            return Preflight(True, msg, chosen, {"max_model_len": best})
    why = "; ".join(plan.warnings) if best >= MIN_CONTEXT and plan.warnings else \
        f"even {MIN_CONTEXT:,} tokens do not fit on {card.name}"
    return Preflight(False, f"{plan.verdict}; {why}", plan, {})


def preflight_train(model, *, gpu: str | None = None, gpu_mem=None, force: bool = False, **settings) -> Preflight:
    """Check a training setting (``settings``: the keyword arguments of :func:`plan_train`, e.g. method='lora',
    batch=2, seq_len=2048, max_pixels=..., gradient_checkpointing=True, lora_r=64, zero=0, gpus=1).

    ok is False when it will not fit (unless ``force``); the message carries the numbers and the first fix.
    """
    card = _card(gpu, gpu_mem)
    if card is None:
        return Preflight(True, "memory preflight skipped: no CUDA device", None, {})
    m = model if isinstance(model, ModelShape) else resolve_model(model)
    plan = plan_train(m.name, _shape=m, _gpu=card, **settings)
    if plan.fits:
        return Preflight(True, f"memory preflight: {plan.verdict}", plan, {})
    fix = next((r.text for r in plan.recommendations if r.fits), None)
    msg = f"memory preflight: {plan.verdict}" + (f"; try {fix}" if fix else "")
    if force:
        return Preflight(True, msg + " (--force: trying anyway)", plan, {})
    return Preflight(False, msg, plan, {})
