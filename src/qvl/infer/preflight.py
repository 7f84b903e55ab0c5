"""Memory preflight for `qvl serve` / `qvl infer` / `qvl chat`, before the model loads (docs/plan.md).

* vLLM: the planner reproduces vLLM's KV-cache accounting and picks the largest ``max_model_len`` that fits
  (instead of vLLM failing its KV-cache check on the default 256K context); nothing fits: a QvlError with the fix.
* transformers: the plan's verdict is printed, and a warning when the context / batch would not fit. It never
  refuses: ``model.generate`` allocates as it goes (short requests still work), and the fast decode path
  sizes its KV cache to the memory left after loading (``sized_cache``).

The card is the detected CUDA device, or ``gpu`` / ``gpu_mem`` (also ``$QVL_GPU`` / ``$QVL_GPU_MEM``); with
neither and no CUDA the check is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from qvl.errors import QvlError


@dataclass
class ServeCheck:
    max_model_len: int | None  # vLLM: the context to ask for; None: keep what was asked (skipped / transformers)
    message: str
    fits: bool | None  # None: skipped
    plan: object = None


def _card(gpu, gpu_mem) -> dict:
    return {"gpu": gpu or os.environ.get("QVL_GPU") or None,
            "gpu_mem": gpu_mem if gpu_mem is not None else (os.environ.get("QVL_GPU_MEM") or None)}


def _gpu(card: dict):
    from qvl.plan.gpus import detect_gpu, gpu_from_args

    return gpu_from_args(card["gpu"], card["gpu_mem"]) if card["gpu"] or card["gpu_mem"] is not None else detect_gpu()


def check_serve(model, *, backend: str = "vllm", max_model_len: int | None = None,
                gpu_memory_utilization: float = 0.9, tensor_parallel_size: int | None = None,
                max_num_seqs: int | None = None, native_context: int | None = None, gpu: str | None = None,
                gpu_mem=None, say=print, sized_cache: bool = False) -> ServeCheck:
    """Plan ``model`` (size, hub id, folder, LoRA folder) for serving; print one line (and a warning)."""
    from qvl.plan.preflight import model_for_plan, preflight_serve

    backend = {"hf": "transformers"}.get(backend, backend)
    card = _card(gpu, gpu_mem)
    if card["gpu"] is None and card["gpu_mem"] is None and _gpu(card) is None:
        msg = "memory preflight skipped: no CUDA device"
        say(msg)
        return ServeCheck(None, msg, None)
    shape = model_for_plan(model)
    if shape is None:
        msg = f"memory preflight skipped: the planner does not know the shape of {model}"
        say(msg)
        return ServeCheck(None, msg, None)
    want = max_model_len
    if native_context:
        want = min(want or native_context, native_context)
    try:
        pf = preflight_serve(shape, backend=backend, max_model_len=want,
                             gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=max_num_seqs,
                             gpus=max(1, tensor_parallel_size or 1), **card)
    except QvlError as e:
        msg = f"memory preflight skipped: {e.what}"
        say(msg)
        return ServeCheck(None, msg, None)
    if pf.plan is None:  # no CUDA device and no card given
        say(pf.message)
        return ServeCheck(None, pf.message, None)
    plan = pf.plan
    if backend == "vllm":
        msg = f"memory preflight (vLLM): {pf.message}"
        say(msg)
        if not pf.ok:
            tp = next((r.changes["gpus"] for r in plan.recommendations if r.fits and "gpus" in r.changes), None)
            fix = "use a larger GPU or a smaller model"
            if tp:
                fix = f"--tensor-parallel-size {tp}, or {fix}"
            raise QvlError(pf.message, where="memory preflight (vLLM)",
                           fix=f"{fix}; raise --gpu-memory-utilization if the card is not shared "
                               "(`qvl plan serve` lists the options)")
        return ServeCheck(pf.settings["max_model_len"], msg, plan.fits, plan)
    from qvl.plan.memory import plan_serve

    plan = plan_serve(shape.name, _shape=shape, _gpu=_gpu(card), backend="transformers", max_model_len=want,
                      max_num_seqs=max_num_seqs or 1, gpus=max(1, tensor_parallel_size or 1),
                      fast_decode=sized_cache)  # the fast path: slot cache, small prefills, vision cache
    asked = plan.settings["max_model_len"]
    seqs = plan.settings.get("max_num_seqs") or 1
    where = f"{asked:,}-token context{f' x {seqs} requests' if seqs > 1 else ''}"
    if plan.fits:
        msg = f"memory preflight (transformers): {where}: {plan.verdict}"
        say(msg)
        return ServeCheck(None, msg, True, plan)
    best = plan.max_model_len_that_fits
    if sized_cache and best:  # the fast decode path allocates its KV cache once, to what is free after loading
        msg = (f"memory preflight (transformers): {where} does not fit whole ({plan.verdict}); the KV cache is "
               f"sized to the free memory after loading (about {best:,} tokens per request)")
        say(msg)
        return ServeCheck(None, msg, False, plan)
    msg = (f"warning: memory preflight (transformers): {where}: {plan.verdict}; "
           + (f"requests longer than ~{best:,} tokens may run out of GPU memory (pass --max-model-len {best} to "
              "refuse them up front)" if best else "even short requests may run out of GPU memory"))
    say(msg)
    return ServeCheck(None, msg, False, plan)
