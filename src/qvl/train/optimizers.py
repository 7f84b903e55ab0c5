"""The optimizer ``optim`` names, by the Hugging Face Trainer's names: torch AdamW, or bitsandbytes' 8-bit AdamW.

    optim                              what steps                         states per trained parameter
    adamw_torch (default), adamw,      torch.optim.AdamW (the fused       2 in the parameter's dtype (fp32 LoRA
    adamw_torch_fused                  kernel on CUDA)                    adapters: 8 bytes)
    adamw_torch_foreach                torch.optim.AdamW, foreach         same
    adamw_8bit, adamw_bnb_8bit         bitsandbytes AdamW8bit             2 x 1 byte (block-wise quantised; tensors
                                                                          under 4,096 elements keep fp32 states)
    paged_adamw_8bit                   bitsandbytes PagedAdamW8bit        as adamw_8bit, in CUDA unified memory the
                                                                          driver pages to the host under pressure

8-bit states are what QLoRA's recipe and Unsloth's notebooks use: at r64 on all of 32B's linears they are 1 GiB
instead of 4. They run on one GPU and under DDP (each rank steps a whole copy); DeepSpeed and FSDP2 shard the states
themselves and are refused.

The learning-rate schedule (:func:`lr_lambda`: warm-up, then constant, linear or cosine) follows the Trainer too.
"""

from __future__ import annotations

import math

import torch

from qvl.errors import QvlError
from qvl.utils.bnb_import import import_bitsandbytes

TORCH_ADAMW = ("adamw_torch", "adamw_torch_fused", "adamw", "adamw_torch_foreach")
EIGHT_BIT = {"adamw_8bit": "AdamW8bit", "adamw_bnb_8bit": "AdamW8bit", "paged_adamw_8bit": "PagedAdamW8bit"}
NAMES = (*TORCH_ADAMW, *EIGHT_BIT)


def is_8bit(optim: str) -> bool:
    return optim in EIGHT_BIT


def plan_name(optim: str) -> str:
    """The planner's name for ``optim`` (``qvl plan train --optim``)."""
    return "adamw8bit" if is_8bit(optim) else "adamw"


def engine_problem(cfg) -> QvlError | None:
    """A refusal for an engine that shards optimizer states itself (it would step bitsandbytes' states as plain
    tensors, or not at all)."""
    if not is_8bit(cfg.optim) or cfg.engine == "ddp":
        return None
    what = "DeepSpeed" if cfg.engine == "deepspeed" else "FSDP2"
    return QvlError(f"optim={cfg.optim} runs on one GPU or under DDP, not under {what}, which shards the optimizer "
                    "states itself", where="optim",
                    fix=f"optim: adamw_torch under {what} (or master_weights: bf16 for 8 bytes per trained "
                        "parameter), or one GPU / DDP for 8-bit states")


def require_bitsandbytes(optim: str, device: torch.device):
    """bitsandbytes, checked by one 8-bit step on ``device`` (a missing install, or no backend for the device, is one
    line here, before anything loads)."""
    bnb = import_bitsandbytes(f"optim={optim}", "optim", "optim: adamw_torch")
    try:
        p = torch.nn.Parameter(torch.ones(4096, device=device))
        p.grad = torch.ones_like(p)
        getattr(bnb.optim, EIGHT_BIT[optim])([p], lr=1e-3).step()
        if not torch.isfinite(p).all():
            raise RuntimeError("the step gave non-finite weights")
    except Exception as e:
        raise QvlError(f"optim={optim}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot step 8-bit states on "
                       f"{device.type.upper()} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
                       where="optim", fix="pip install -U bitsandbytes, or optim: adamw_torch") from None
    return bnb


def torch_adamw_options(optim: str, device: torch.device) -> dict:
    """Extra ``torch.optim.AdamW`` arguments: the fused kernel on CUDA unless ``adamw_torch_foreach`` is asked (same
    update, one kernel for all parameters)."""
    if device.type == "cuda" and optim != "adamw_torch_foreach":
        return {"fused": True}
    return {"foreach": True} if optim == "adamw_torch_foreach" else {}


def build(groups: list[dict], cfg, device: torch.device, sharded_states: bool = False) -> torch.optim.Optimizer:
    """``cfg.optim`` over qvl's parameter groups (each with its name, LR and weight decay). ``sharded_states``: FSDP2's
    DTensor states, which take torch AdamW's default (per-tensor) path."""
    kw = {"lr": cfg.learning_rate, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if is_8bit(cfg.optim):
        import bitsandbytes as bnb

        return getattr(bnb.optim, EIGHT_BIT[cfg.optim])(groups, **kw)
    return torch.optim.AdamW(groups, **kw, **({} if sharded_states else torch_adamw_options(cfg.optim, device)))


def lr_lambda(cfg, total_steps: int):
    """The learning-rate multiplier at each optimizer step (``torch.optim.lr_scheduler.LambdaLR``): warm-up
    (``warmup_steps``, else ``warmup_ratio`` of the run) then ``lr_scheduler_type``, as the Hugging Face Trainer's
    constant / constant_with_warmup / linear / cosine."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)
    kind = cfg.lr_scheduler_type

    def f(step: int) -> float:
        if step < warmup and kind != "constant":
            return (step + 1) / (warmup + 1) if warmup else 1.0
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))  # cosine

    return f
