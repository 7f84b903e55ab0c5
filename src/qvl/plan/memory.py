"""The memory planner: predict per-GPU peak memory for serving and training Qwen3-VL, before anything loads.

Everything is counted in bytes from the model shape (``qvl.plan.model``) and the user's settings, then
reported in GiB. The counting rules are documented in ``docs/plan.md``; the constants below are the only
tunable numbers, each with the reason for its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from qvl.errors import QvlError
from qvl.plan.gpus import GIB, Gpu, gpu_from_args
from qvl.plan.model import ModelShape, resolve_model
from qvl.plan.vllm import accounting_for as vllm_accounting_for
from qvl.plan.vllm import budget as vllm_budget
from qvl.plan.vllm import default_batching

# --- constants ------------------------------------------------------------------------------------------
CUDA_CONTEXT_GIB = 0.5  # CUDA context + cuBLAS/cuDNN workspaces, outside torch's allocator
NCCL_GIB = 0.5  # NCCL communicators and buffers, only with --gpus > 1
ALLOCATOR_FRACTION = 0.05  # torch caching-allocator reserve over peak allocated (fragmentation)
# Training loss: bf16 logits (2) + fp32 log-softmax kept for backward (4) + its grad (4) + the grad of the
# upcast logits (4) are alive together at the start of backward: 14 bytes per vocab entry per token.
LOGITS_TRAIN_BYTES = 14
# qvl's fused linear + cross-entropy (qvl.train.loss_head) makes logits in row chunks of about this many bytes
# (compute dtype + fp32): the tokens x vocabulary tensor never exists.
CE_CHUNK_BYTES = 256 * 2**20
LORA_ADAPTER_BYTES = 4  # peft keeps adapters in fp32 (autocast_adapter_dtype=True) on a bf16 base
NF4_BYTES = 4.127 / 8  # 4-bit NF4 + double-quantised absmax (bitsandbytes, blocksize 64)
INT8_BYTES = 1.0  # LLM.int8 codes; its fp32 scale per output row adds 4 / in_features bytes (< 0.1 %)
QUANT_BYTES = {"nf4": NF4_BYTES, "int8": INT8_BYTES}  # `quantization` (qvl.train.quantize) -> bytes per weight
ZERO_BUCKET_ELEMS = 2e8  # DeepSpeed reduce/allgather bucket sizes (official zero2/zero3 json)
MODEL_MAX_LEN = 262_144  # Qwen3-VL native context (max_position_embeddings)

LORA_TARGETS_ALL = ("q", "k", "v", "o", "gate", "up", "down")  # the LLM's linears ("all", "llm")
# LoRA beyond the LLM (qvl train's lora_targets: vision, merger): the tower blocks' qkv / proj / fc1 / fc2 and the main
# merger's two linears (qvl.train.components.LORA_PATTERNS)
LORA_TARGETS_VISUAL = ("vision", "merger")
_TARGET_ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate",
                   "up_proj": "up", "down_proj": "down"}


# --- the result ------------------------------------------------------------------------------------------
@dataclass
class Recommendation:
    text: str
    changes: dict  # keyword arguments that, applied to the same plan_* call, give this setting
    total_gib: float | None = None
    fits: bool | None = None


@dataclass
class Plan:
    mode: str  # "serve" or "train"
    model: str
    gpu: str
    gpu_total_gib: float
    gpus: int
    settings: dict
    parts: dict[str, float]  # name → GiB, per GPU; they add up to total_gib
    notes: dict[str, str]  # name → how it was counted
    total_gib: float
    peak_allocated_gib: float  # torch tensors only (what torch.cuda.max_memory_allocated reports)
    fits: bool
    headroom_gib: float
    kv_bytes_per_token: int
    kv_needed_gib: float | None = None
    kv_available_gib: float | None = None
    max_model_len_that_fits: int | None = None
    max_batch_that_fits: int | None = None
    max_seq_len_that_fits: int | None = None
    cpu_ram_gib: float = 0.0  # offloaded states (ZeRO offload), per GPU
    kv_margin_gib: float | None = None  # ± on kv_available_gib (vLLM: the spread of the logs behind each term)
    warnings: list[str] = field(default_factory=list)
    recommendations: list[Recommendation] = field(default_factory=list)

    @property
    def kv_estimate(self) -> str:
        """'≈ 4.5 ± 1.0 GiB': vLLM's KV budget and its margin ('' without vLLM)."""
        if self.kv_available_gib is None:
            return ""
        margin = f" ± {self.kv_margin_gib:.1f}" if self.kv_margin_gib else ""
        return f"≈ {self.kv_available_gib:.1f}{margin} GiB"

    @property
    def verdict(self) -> str:
        if not self.fits:
            if self.kv_available_gib is not None and self.kv_needed_gib is not None \
                    and self.kv_available_gib < self.kv_needed_gib:
                return (f"does not fit: one {self.settings['max_model_len']:,}-token sequence needs "
                        f"{self.kv_needed_gib:.1f} GiB of KV cache, vLLM would have {self.kv_estimate}")
            return f"does not fit: needs {self.total_gib:.1f} GiB of {self.gpu_total_gib:.1f} GiB " \
                   f"({-self.headroom_gib:.1f} GiB over)"
        tight = " (tight: under 5% headroom)" if self.headroom_gib < 0.05 * self.gpu_total_gib else ""
        kv = ""
        if self.kv_available_gib is not None and self.kv_needed_gib is not None:
            kv = f"; vLLM KV cache {self.kv_estimate} for {self.kv_needed_gib:.1f} GiB needed"
            if self.kv_margin_gib and self.kv_available_gib - self.kv_margin_gib < self.kv_needed_gib:
                kv += " (within the margin: may not start)"
        return f"fits: {self.total_gib:.1f} GiB of {self.gpu_total_gib:.1f} GiB, " \
               f"{self.headroom_gib:.1f} GiB headroom{tight}{kv}"

    def to_json(self) -> dict:
        return {
            "mode": self.mode, "model": self.model, "gpu": self.gpu, "gpu_total_gib": round(self.gpu_total_gib, 2),
            "gpus": self.gpus, "settings": self.settings,
            "fits": self.fits, "verdict": self.verdict,
            "total_gib": round(self.total_gib, 2), "peak_allocated_gib": round(self.peak_allocated_gib, 2),
            "headroom_gib": round(self.headroom_gib, 2),
            "parts": {k: round(v, 3) for k, v in self.parts.items()},
            "notes": self.notes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_needed_gib": None if self.kv_needed_gib is None else round(self.kv_needed_gib, 2),
            "kv_available_gib": None if self.kv_available_gib is None else round(self.kv_available_gib, 2),
            "kv_margin_gib": None if self.kv_margin_gib is None else round(self.kv_margin_gib, 2),
            "max_model_len_that_fits": self.max_model_len_that_fits,
            "max_batch_that_fits": self.max_batch_that_fits,
            "max_seq_len_that_fits": self.max_seq_len_that_fits,
            "cpu_ram_gib": round(self.cpu_ram_gib, 2),
            "warnings": self.warnings,
            "recommendations": [r.text for r in self.recommendations],
            "recommended_changes": [r.changes for r in self.recommendations],
        }


# --- shared counting helpers -----------------------------------------------------------------------------
def _gib(nbytes: float) -> float:
    return nbytes / GIB


def visual_tokens_image(m: ModelShape, pixels: int) -> int:
    """LLM tokens of one image under a pixel budget: pixels / (32·32)."""
    return max(1, math.ceil(pixels / m.pixels_per_visual_token))


def visual_tokens_video(m: ModelShape, frames: int, frame_pixels: int) -> int:
    """LLM tokens of one video: frames are merged in pairs (temporal patch 2), each pair gives pixels/(32·32)."""
    if frames <= 0:
        return 0
    return math.ceil(frames / m.temporal_patch) * visual_tokens_image(m, frame_pixels)


def _lora_dims(m: ModelShape, targets) -> list[tuple[int, int]]:
    dims = {"q": (m.hidden, m.q_dim), "k": (m.hidden, m.kv_dim), "v": (m.hidden, m.kv_dim),
            "o": (m.q_dim, m.hidden), "gate": (m.hidden, m.intermediate), "up": (m.hidden, m.intermediate),
            "down": (m.intermediate, m.hidden)}
    if m.is_moe:  # experts are fused parameters: LoRA goes on attention only
        dims = {k: v for k, v in dims.items() if k in ("q", "k", "v", "o")}
    return [dims[t] for t in targets if t in dims]


def parse_lora_targets(targets) -> tuple[str, ...]:
    """The adapted linears: LLM ones of :data:`LORA_TARGETS_ALL` ("all" / "llm" / "all-linear": every one) and the
    components of :data:`LORA_TARGETS_VISUAL` ("vision" alone: no LLM adapters). None named is an error."""
    if targets is None or targets == "all" or targets == ["all"]:
        return LORA_TARGETS_ALL
    if isinstance(targets, str):
        targets = [t for t in targets.replace(" ", "").split(",") if t]
    out: list[str] = []
    for t in targets:
        t = _TARGET_ALIASES.get(t, t)
        names = LORA_TARGETS_ALL if t in ("all-linear", "all", "llm") else (t,)
        if not set(names) <= set(LORA_TARGETS_ALL + LORA_TARGETS_VISUAL):
            raise QvlError(f"unknown LoRA target {t!r}", fix=f"use 'all' or a comma list of "
                           f"{','.join(LORA_TARGETS_ALL + LORA_TARGETS_VISUAL)}")
        out += [n for n in names if n not in out]
    if not out:
        raise QvlError("no LoRA target named", fix=f"use 'all' or a comma list of "
                       f"{','.join(LORA_TARGETS_ALL + LORA_TARGETS_VISUAL)}")
    return tuple(out)


def llm_lora_targets(targets) -> tuple[str, ...]:
    """The LLM's linears among parsed ``targets`` (what a decoder layer's activations and adapters count)."""
    return tuple(t for t in targets if t in LORA_TARGETS_ALL)


def lora_params(m: ModelShape, r: int, targets=LORA_TARGETS_ALL, experts: bool = False) -> int:
    """LoRA A and B matrices, r·(d_in + d_out) per adapted linear: on every LLM layer; on every vision block's qkv,
    proj, fc1 and fc2 for "vision", the main merger's two linears for "merger"; ``experts`` (MoE, qvl's
    ``lora_experts``): + :func:`expert_lora_params`."""
    vh, vi, mh = m.vision_hidden, m.vision_intermediate, m.vision_hidden * m.spatial_merge**2
    vision = m.vision_depth * r * ((vh + 3 * vh) + 2 * vh + 2 * (vh + vi)) if "vision" in targets else 0
    merger = r * (2 * mh + mh + m.hidden) if "merger" in targets else 0
    return m.layers * sum(r * (din + dout) for din, dout in _lora_dims(m, targets)) + vision + merger + \
        (expert_lora_params(m, r) if experts else 0)


def expert_lora_params(m: ModelShape, r: int) -> int:
    """LoRA on a MoE model's experts (peft ``target_parameters`` on the 3-D gate_up_proj and down_proj): one rank-r
    pair per expert and weight, r·E·((h + 2I) + (I + h)) per layer (30B-A3B at r=64: 2.5 B params); 0 for dense."""
    if not m.is_moe:
        return 0
    return m.layers * r * m.moe_experts * (2 * m.hidden + 3 * m.moe_intermediate)


def _mlp_width(m: ModelShape) -> int:
    """MLP width one token goes through (MoE: its top-k experts)."""
    return m.moe_topk * m.moe_intermediate if m.is_moe else m.intermediate


def layer_saved_bytes_per_token(m: ModelShape, lora_r: int = 0, targets=(), lora_dropout: float = 0.0,
                                gqa_repeat: bool = False, expert_lora: bool = False) -> int:
    """Activations one decoder layer keeps for backward, per token (bf16, sdpa/flash attention, no L² term).

    Two fp32 RMSNorms (10·h each), q/k/v and their per-head norms and RoPE copies, attention output,
    SwiGLU (gate, silu(gate), up, product: 8·I), and for LoRA the bf16 input copy (+ dropout mask) and the
    rank-r intermediate of every adapted linear. MoE: each token's top-k routed copies (the experts' input, the
    down projection's output kept for the routing weights' gradient), their sort order and its inverse (int64),
    fp32 router logits and probabilities; ``expert_lora``: the two rank-r intermediates per routed copy
    (:mod:`qvl.models.moe_experts`; the experts' inputs the adapters need are kept already).
    """
    h, qd, kvd, inter = m.hidden, m.q_dim, m.kv_dim, _mlp_width(m)
    b = 20 * h + 18 * qd + 16 * kvd + 8 * inter
    if m.is_moe:
        b += m.moe_topk * (4 * h + 16) + 8 * m.moe_experts
        if lora_r and expert_lora:
            b += m.moe_topk * 2 * (2 * lora_r)
    if gqa_repeat:  # sdpa with a padding mask expands K and V to all heads
        b += 4 * qd
    if lora_r:
        per_in = 3 if lora_dropout > 0 else 2
        b += sum(per_in * din + 2 * lora_r for din, _ in _lora_dims(m, targets))
    return b


def attention_saved_bytes_per_token(m: ModelShape) -> int:
    """What a decoder layer recomputed with ``gradient_checkpointing_scope: mlp`` keeps beyond its input, per token:
    the q, k, v and o projections' outputs and the attention output (bf16), and its fp32 log-sum-exp per head."""
    return 2 * (2 * m.q_dim + 2 * m.kv_dim + m.hidden) + 4 * m.heads


# activation_memory_budget levels the planner knows for compiled layers: None (the compiler's default partition) and
# 0.8 (below 0.8 the partitioner starts recomputing matmuls; 0.8's figure is then an upper bound). 0.9 is not among
# them since key / value heads reach flash grouped: not measured so, and 0.8 was as fast as the default partition
COMPILED_BUDGETS = (None, 0.8)


def compiled_layer_saved_bytes_per_token(m: ModelShape, budget: float | None = None, lora_r: int = 0,
                                         n_adapters: int = 0, mlp_trains: bool = False, dropout_targets=()) -> int:
    """What one whole decoder layer compiled by inductor keeps for backward per token beyond its input, not
    recomputed, with frozen projections (LoRA on attention, bf16 autocast), under ``activation_memory_budget``.

    Measured on the 8B layer (``bench/experiments/layer_memory.py``, H100, 8,192-token rows, key / value heads
    handed to flash grouped: 94.8 / 76.6 KB per token for the default partition / 0.8; 106.8 / 68.7 when they were
    repeated per query head, bench/experiments/results/layer_memory_grouped_h100.txt) and written in the model's
    widths: the SwiGLU gate and up outputs (its product and the down projection's input are recomputed), the
    attention's q, k, v and output, its log-sum-exp, a hidden-wide copy and the adapters' rank-r intermediates; the
    default partition keeps pre-norm and pre-RoPE copies 0.8 recomputes instead (a budget between: counted as the
    default). ``mlp_trains`` (MLP weights or adapters on them; not measured): the MLP
    projections' inputs too, which their weight gradients need. MoE (not measured compiled): the routed copies, their
    order and the router's fp32 tensors as :func:`layer_saved_bytes_per_token` counts them eagerly.
    ``dropout_targets`` (LoRA dropout on these adapters): their dropout's outputs, counted as eager layers keep them.
    """
    h, qd, kvd, inter = m.hidden, m.q_dim, m.kv_dim, _mlp_width(m)
    b = 4 * inter + 2 * (qd + 2 * kvd + 2 * h) + 4 * m.heads + 2 * lora_r * n_adapters
    # counted as eager layers keep them (dropped bf16 copy + mask: 3 bytes per adapter input, 111 KB a token on the
    # 8B layer), above what whole compiled layers were seen to keep: lora_8b_24gb.yaml on an H100 capped at 31.4 GiB
    # (torch may allocate 30.9), 2026-12-06: 23 layers kept at this function's figure without the term peaked at 28.6
    # GiB allocated and ran out of memory at step 8 (train_cli_32gb_whole_h100.json); 13 kept with it peaked at 25.7,
    # 28.6 reserved (train_cli_cards_h100.json): ~0.30 GiB a kept layer at 2,048 tokens from the two (0.27 without
    # the term), and the allocator held 2-3 GiB beyond the allocated peak, which the eager figure leaves room for.
    b += sum(3 * din for din, _ in _lora_dims(m, dropout_targets))
    if m.is_moe:
        b += m.moe_topk * (4 * h + 16) + 8 * m.moe_experts
    if mlp_trains:
        b += 2 * h + 2 * inter
    if budget is None or budget > 0.8:
        b += 2 * (qd + kvd + h)
    return b


def layer_transient_bytes_per_token(m: ModelShape) -> int:
    """Inference (no grad) working set of one decoder layer, per token: residual + fp32 norm + the larger of
    attention (q, k, v, RoPE copies, output) and the SwiGLU MLP (gate, up, act, product). MoE (transformers'
    grouped-GEMM experts): the k routed copies of the token stay alive through the block, so its peak is the
    larger of gate_up + act + product beside them, and four k-copies at the end (copies, down output, weighted,
    unsorted), plus the router's logits and float32 probabilities."""
    h, qd, kvd, inter = m.hidden, m.q_dim, m.kv_dim, _mlp_width(m)
    if m.is_moe:
        k, i = m.moe_topk, m.moe_intermediate
        mlp = max(2 * k * (h + 4 * i), 8 * k * h) + 6 * m.moe_experts
    else:
        mlp = 8 * inter
    return 12 * h + max(6 * qd + 6 * kvd, mlp)


def vision_transient_bytes_per_patch(m: ModelShape) -> int:
    """Vision encoder working set (no grad) per patch: the larger of the attention block (qkv, fp32 RoPE on
    q/k) and the MLP, plus the fp32 pixel input. (The bf16 copy of the pixels is gone by then: the tower
    rebinds it to the patch embedding's output before the first block, so only the caller's fp32 tensor is
    alive at the block peak; the vLLM logs in tests/plan/vllm_logs.json agree, see qvl.plan.vllm.)"""
    vh, vi = m.vision_hidden, m.vision_intermediate
    pixel = 3 * m.temporal_patch * m.patch_size**2
    return max(26 * vh, 4 * vh + 4 * vi) + 2 * vh + 4 * pixel


def vision_saved_bytes_per_patch(m: ModelShape) -> int:
    """Activations one vision block keeps for backward, per patch (LayerNorms, qkv, fp32 RoPE, MLP)."""
    vh, vi = m.vision_hidden, m.vision_intermediate
    return 26 * vh + 4 * vi


def _search_max(fn, lo: int, hi: int) -> int | None:
    """Largest x in [lo, hi] with fn(x) true, assuming fn is monotone (true then false). None if fn(lo) is false."""
    if not fn(lo):
        return None
    if fn(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fn(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _finish(plan: Plan) -> Plan:
    plan.total_gib = sum(plan.parts.values())
    plan.headroom_gib = plan.gpu_total_gib - plan.total_gib
    if plan.kv_available_gib is None:
        plan.fits = plan.headroom_gib >= 0
    return plan


# --- serve -------------------------------------------------------------------------------------------------
HUB_IMAGE_MAX_PIXELS = 16_777_216  # official preprocessor_config.json longest_edge
# The transformers engine's fast decode path (qvl.infer.continuous / transformers_backend defaults; a test checks
# them): one prefill runs at most this many tokens (or one longer prompt) of at most this many requests, and the
# vision cache keeps up to this much of the encoder's outputs on the GPU.
FAST_PREFILL_TOKENS = 16_384
FAST_PREFILL_REQUESTS = 8
FAST_PREFILL_PART_TOKENS = 4096  # a longer prompt arriving while others decode goes in parts of this many tokens
FAST_VISION_CACHE_GIB = 1.0


def plan_serve(model="8B", gpu: str | None = None, gpu_mem=None, *, backend: str = "vllm",
               max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
               max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
               image_tokens: int | None = None, video_frames: int = 0, video_frame_tokens: int = 256,
               kv_cache_dtype: str = "auto", enforce_eager: bool = False, gpus: int = 1,
               vllm_version: str | None = None, vllm_engine: str | None = None, skip_mm_profiling: bool = False,
               recommend: bool = True, fast_decode: bool = False, _shape: ModelShape | None = None,
               _gpu: Gpu | None = None) -> Plan:
    """Predict per-GPU memory for serving. vLLM: reproduce vLLM's KV budget (``qvl.plan.vllm``: the accounting
    of ``vllm_version``, default the newest; ``vllm_engine='v0'`` for the V0 engine); transformers: peak of
    generate, or with ``fast_decode`` of the fast decode path (`qvl serve`'s default: a slot KV cache for
    ``max_num_seqs`` requests, prefills of at most FAST_PREFILL_TOKENS tokens, the vision cache).
    ``skip_mm_profiling``: vLLM's --skip-mm-profiling (or --limit-mm-per-prompt with every modality 0):
    no vision-encoder profile."""
    m = _shape or resolve_model(model)
    card = _gpu or gpu_from_args(gpu, gpu_mem)
    if backend not in ("vllm", "transformers", "hf"):
        raise QvlError(f"unknown backend {backend!r}", fix="use --backend vllm or --backend transformers")
    backend = "transformers" if backend == "hf" else backend
    if gpus < 1:
        raise QvlError("--gpus must be at least 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise QvlError(f"--gpu-memory-utilization must be in (0, 1], got {gpu_memory_utilization}")
    if kv_cache_dtype not in ("auto", "bf16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2"):
        raise QvlError(f"unknown KV cache dtype {kv_cache_dtype!r}", fix="use auto (bf16) or fp8")
    kv_dtype_bytes = 1 if kv_cache_dtype.startswith("fp8") else 2
    model_len = max_model_len or MODEL_MAX_LEN
    if image_tokens is None:
        image_tokens = visual_tokens_image(m, HUB_IMAGE_MAX_PIXELS) if backend == "vllm" else 1024
    video_tokens = math.ceil(video_frames / m.temporal_patch) * video_frame_tokens if video_frames else 0
    mm_item_tokens = max(image_tokens, video_tokens)
    acct = vllm_accounting_for(vllm_version, vllm_engine)
    if backend == "vllm":
        dflt_seqs, dflt_tokens = default_batching(acct, card.total_gib, model_len)
        max_num_seqs = max_num_seqs or dflt_seqs
        max_num_batched_tokens = max_num_batched_tokens or dflt_tokens
    elif max_num_seqs is None:
        max_num_seqs = 1
    settings = dict(backend=backend, max_model_len=model_len, gpu_memory_utilization=gpu_memory_utilization,
                    max_num_seqs=max_num_seqs, image_tokens=image_tokens, video_frames=video_frames,
                    kv_cache_dtype=kv_cache_dtype, gpus=gpus)
    if backend == "transformers" and fast_decode:
        settings.update(fast_decode=True)
    if backend == "vllm":
        settings.update(max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager,
                        vllm_version=vllm_version, vllm_engine=vllm_engine, vllm_accounting=acct.name,
                        skip_mm_profiling=skip_mm_profiling)

    tp = gpus
    kv_per_token = m.kv_bytes_per_token(kv_dtype_bytes)
    kv_per_token_gpu = kv_per_token / min(tp, m.kv_heads)  # KV heads split over TP, replicated beyond
    weights = m.params_total * 2 / tp
    patches = mm_item_tokens * m.spatial_merge**2
    vision = patches * vision_transient_bytes_per_patch(m) / tp
    parts: dict[str, float] = {}
    notes: dict[str, str] = {}
    parts["CUDA context"] = CUDA_CONTEXT_GIB
    notes["CUDA context"] = "CUDA context and library workspaces, outside torch"
    if tp > 1:
        parts["NCCL buffers"] = NCCL_GIB
        notes["NCCL buffers"] = f"tensor parallel over {tp} GPUs"
    parts["weights"] = _gib(weights)
    notes["weights"] = f"{m.params_total / 1e9:.2f} B params × 2 bytes (bf16)" + (f" / TP {tp}" if tp > 1 else "")

    plan = Plan("serve", m.name, card.name, card.total_gib, gpus, settings, parts, notes, 0.0, 0.0, True, 0.0,
                kv_per_token)
    kv_needed = model_len * kv_per_token_gpu
    plan.kv_needed_gib = _gib(kv_needed)

    if backend == "vllm":
        requested = card.total_gib * gpu_memory_utilization * GIB
        b = vllm_budget(m, card_gib=card.total_gib, utilization=gpu_memory_utilization, tp=tp, max_model_len=model_len,
                        mm_item_tokens=mm_item_tokens, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens, enforce_eager=enforce_eager, acct=acct,
                        weights_bytes=weights, vision_patch_bytes=vision_transient_bytes_per_patch(m),
                        skip_mm_profiling=skip_mm_profiling)
        for name in ("vLLM non-torch memory", "vLLM profiling peak"):
            parts[name] = b.parts[name]
            notes[name] = b.notes[name]
        parts["CUDA graphs"] = b.graphs_gib
        notes["CUDA graphs"] = b.notes["CUDA graphs"]
        kv_avail = b.kv_available_gib * GIB
        peak = b.parts["vLLM profiling peak"] * GIB
        parts["KV cache (allocated)"] = max(0.0, _gib(kv_avail))
        notes["KV cache (allocated)"] = (f"{gpu_memory_utilization:.2f} × {card.total_gib:.1f} GiB − weights − "
                                         "non-torch − profiling peak" +
                                         (" − CUDA graphs" if acct.graphs_subtracted else "") +
                                         f"; vLLM takes all of it ({acct.name}); ± {b.margin_gib:.1f} GiB")
        plan.kv_margin_gib = b.margin_gib
        if acct.warning:
            plan.warnings.append(acct.warning)
        if skip_mm_profiling and m.vision_hidden:
            plan.warnings.append("no vision-encoder profile: vLLM keeps no memory for it, so the first large image "
                                 f"can run out of memory (the encoder on a {mm_item_tokens:,}-token item takes "
                                 f"~{_gib(mm_item_tokens * m.spatial_merge**2 * vision_transient_bytes_per_patch(m)):.1f} GiB)")
        plan.kv_available_gib = _gib(kv_avail)
        cap_tokens = int(max(0, kv_avail) // kv_per_token_gpu)
        plan.max_model_len_that_fits = min(MODEL_MAX_LEN, cap_tokens // 16 * 16) if cap_tokens >= 16 else 0
        plan.peak_allocated_gib = _gib(weights + peak + max(0, kv_avail))
        _finish(plan)
        startup_ok = card.total_gib - CUDA_CONTEXT_GIB - (NCCL_GIB if tp > 1 else 0) >= _gib(requested)
        plan.fits = kv_avail >= kv_needed and startup_ok and plan.headroom_gib >= 0
        if not startup_ok:
            plan.warnings.append(f"--gpu-memory-utilization {gpu_memory_utilization} asks for {_gib(requested):.1f} GiB "
                                 f"but only ~{card.total_gib - CUDA_CONTEXT_GIB:.1f} GiB is free after the CUDA "
                                 "context; vLLM refuses to start")
        if kv_avail > 0:
            conc = kv_avail / kv_needed
            plan.notes["KV cache (allocated)"] += f"; holds {cap_tokens:,} tokens = {conc:.2f}× one " \
                                                  f"{model_len:,}-token sequence"
    else:
        batch = max_num_seqs
        kv = batch * kv_needed
        # prefill of the whole prompt at once (worst case: the prompt fills the context); the fast path's
        # continuous batcher prefills a few requests at a time
        rows = min(batch, FAST_PREFILL_REQUESTS) if fast_decode else batch
        tokens = min(rows * model_len, max(model_len, FAST_PREFILL_TOKENS)) if fast_decode else batch * model_len
        # (the fast path's packed prefill, qvl.infer.packed_prefill, writes each layer's keys / values straight into
        # the slots: no temporary cache as transformers' forward builds; its embedded row is the embeddings and three
        # dense DeepStack features, 8 bytes x hidden a token)
        prefill = tokens * (layer_transient_bytes_per_token(m) / tp + (8 if fast_decode else 6) * m.hidden)
        if fast_decode and model_len > FAST_PREFILL_PART_TOKENS:  # a prompt in parts keeps its row meanwhile
            prefill += model_len * 8 * m.hidden
        logits = rows * m.vocab * 10  # last-token logits: bf16 + fp32 copy + softmax
        parts["KV cache"] = _gib(kv)
        notes["KV cache"] = f"{batch} × {model_len:,} tokens × {kv_per_token_gpu / 1024:.0f} KiB"
        act = max(vision, prefill + logits)
        parts["activations (prefill / vision)"] = _gib(act)
        notes["activations (prefill / vision)"] = (
            f"max(prefill of {tokens:,} tokens {_gib(prefill):.2f} GiB, vision encoder on a "
            f"{mm_item_tokens:,}-token item {_gib(vision):.2f} GiB)")
        alloc = weights + kv + act
        if fast_decode and m.vision_hidden:
            parts["vision cache"] = FAST_VISION_CACHE_GIB
            notes["vision cache"] = "encoder outputs of recent images, kept for follow-up turns (at most)"
            alloc += FAST_VISION_CACHE_GIB * GIB
        parts["allocator reserve"] = _gib(alloc) * ALLOCATOR_FRACTION
        notes["allocator reserve"] = f"{ALLOCATOR_FRACTION:.0%} of peak allocated (fragmentation)"
        plan.peak_allocated_gib = _gib(alloc)
        _finish(plan)

        def fits_len(n: int) -> bool:
            return plan_serve(m.name, _shape=m, _gpu=card, backend=backend, max_model_len=n, max_num_seqs=batch,
                              image_tokens=image_tokens, video_frames=video_frames,
                              video_frame_tokens=video_frame_tokens, kv_cache_dtype=kv_cache_dtype, gpus=gpus,
                              recommend=False, fast_decode=fast_decode).fits
        if recommend:  # the bisection's own plans (recommend=False) must not search again
            best = _search_max(fits_len, 16, MODEL_MAX_LEN)
            plan.max_model_len_that_fits = (best // 16 * 16) if best else 0
    if recommend:
        plan.recommendations = _serve_recommendations(plan, m, card)
    return plan


def _serve_recommendations(plan: Plan, m: ModelShape, card: Gpu) -> list[Recommendation]:
    s = plan.settings
    out: list[Recommendation] = []
    base = dict(backend=s["backend"], max_model_len=s["max_model_len"], max_num_seqs=s["max_num_seqs"],
                gpu_memory_utilization=s["gpu_memory_utilization"], image_tokens=s["image_tokens"],
                video_frames=s["video_frames"], kv_cache_dtype=s["kv_cache_dtype"], gpus=s["gpus"])
    if s["backend"] == "vllm":
        base.update(max_num_batched_tokens=s["max_num_batched_tokens"], enforce_eager=s["enforce_eager"],
                    vllm_version=s["vllm_version"], vllm_engine=s["vllm_engine"],
                    skip_mm_profiling=s["skip_mm_profiling"])
    elif s.get("fast_decode"):
        base.update(fast_decode=True)

    def trial(text: str, **changes) -> None:
        p = plan_serve(m.name, _shape=m, _gpu=card, recommend=False, **{**base, **changes})
        out.append(Recommendation(text.format(p=p) + ("" if p.fits else " (helps; alone not enough)"), changes,
                                  round(p.total_gib, 2), p.fits))

    best = plan.max_model_len_that_fits or 0
    if not plan.fits:
        if best >= 1024:
            n = best // 1024 * 1024
            kv = n * plan.kv_bytes_per_token / min(s["gpus"], m.kv_heads) / GIB
            trial(f"--max-model-len {n:,} (largest that fits, in steps of 1024; KV {kv:.1f} GiB)", max_model_len=n)
        if s["backend"] == "vllm":
            for u in (0.95,):
                if u > s["gpu_memory_utilization"]:
                    trial(f"--gpu-memory-utilization {u} (KV available {{p.kv_available_gib:.1f}} GiB)",
                          gpu_memory_utilization=u)
            if s["kv_cache_dtype"] == "auto":
                trial("--kv-cache-dtype fp8 (halves the KV cache: {p.kv_bytes_per_token:,} bytes/token)",
                      kv_cache_dtype="fp8")
            if s["image_tokens"] > 4096:
                trial("limit images to 4,096 visual tokens (--mm-processor-kwargs '{{\"max_pixels\": 4194304}}'): "
                      "smaller vision-encoder profiling peak", image_tokens=4096)
        if s["gpus"] < 8:
            for g in (2, 4, 8):
                if g > s["gpus"] and g <= m.kv_heads:
                    p = plan_serve(m.name, _shape=m, _gpu=card, recommend=False, **{**base, "gpus": g})
                    if p.fits:
                        out.append(Recommendation(f"--gpus {g} (tensor parallel)", {"gpus": g},
                                                  round(p.total_gib, 2), True))
                        break
                    n = (p.max_model_len_that_fits or 0) // 1024 * 1024
                    if n >= 4096:  # the full context does not fit even split: the largest that does
                        p = plan_serve(m.name, _shape=m, _gpu=card, recommend=False,
                                       **{**base, "gpus": g, "max_model_len": n})
                        if p.fits:
                            out.append(Recommendation(f"--gpus {g} --max-model-len {n:,} (tensor parallel; the "
                                                      "largest context that fits, in steps of 1024)",
                                                      {"gpus": g, "max_model_len": n}, round(p.total_gib, 2), True))
                            break
        out.sort(key=lambda r: not r.fits)
    else:
        if s["backend"] == "vllm" and plan.kv_available_gib and plan.kv_needed_gib:
            c = plan.kv_available_gib / plan.kv_needed_gib
            out.append(Recommendation(
                f"fits: the KV cache holds {c:.1f} full-length sequences; shorter requests share it "
                f"(max concurrency at full length ≈ {c:.1f})", {}, round(plan.total_gib, 2), True))
        elif best and best > s["max_model_len"]:
            out.append(Recommendation(f"context could grow to {best:,} tokens", {"max_model_len": best},
                                      None, True))
    return out


# --- train -------------------------------------------------------------------------------------------------
def plan_train(model="8B", gpu: str | None = None, gpu_mem=None, *, method: str = "lora", zero: int = 0,
               offload: bool = False, gradient_checkpointing: bool = True, batch: int = 1, seq_len: int = 2048,
               max_pixels: int = 451_584, images_per_sample: int = 1, video_max_frames: int = 0,
               video_frame_pixels: int = 262_144, lora_r: int = 64, lora_targets="all", lora_dropout: float = 0.05,
               tune_mm_vision: bool = False, tune_mm_mlp: bool | None = None, tune_mm_llm: bool = True,
               optim: str = "adamw", gpus: int = 1, recommend: bool = True, master_fp32: bool = False,
               master_bf16: bool = False, fused_ce: bool = False, recompute_keeps_attention: bool = False, _shape: ModelShape | None = None, _gpu: Gpu | None = None,
               lora_experts: bool = True,
               quantization: str | None = None, quantization_targets=("llm",), host_embeddings: bool = False,
               offload_activations: bool = False, visual_tokens_max: int | None = None) -> Plan:
    """Predict per-GPU peak memory of one training step (forward + backward + optimizer step).

    ``seq_len`` is the padded length of one sample in tokens, visual tokens included (what
    ``model_max_length`` counts); ``batch`` is the per-GPU micro-batch. ``master_fp32``: fully trained
    weights (and so their gradients and AdamW states) in fp32 without ZeRO (``master_weights: fp32``).
    ``master_bf16``: with ZeRO / FSDP2 (``zero`` >= 1) the engine keeps bf16 master weights, gradient partitions and
    AdamW states (``master_weights: bf16``; DeepSpeed's bf16_master_weights_and_grads + bf16_optimizer_states); without
    ZeRO, LoRA adapters (and their gradients and torch AdamW states) in bf16 instead of fp32.
    ``fused_ce``: the loss as qvl's fused linear + cross-entropy computes it (``fused_cross_entropy``): logits
    chunk by chunk instead of the whole tokens x vocabulary tensor and its fp32 copies.
    ``recompute_keeps_attention``: checkpointed layers keep their attention half (``gradient_checkpointing_scope:
    mlp``, :func:`attention_saved_bytes_per_token`).
    ``lora_experts``: MoE models, LoRA on the experts too (`qvl train`'s ``lora_experts``, on by default).
    ``quantization``: nf4 or int8 LLM linears under LoRA (``quantization`` in `qvl train`; ``method="qlora"`` is
    LoRA with nf4). ``quantization_targets``: whose linear layers are quantised (llm; vision and merger too when
    named, as `qvl train`'s key); the others stay bf16.
    ``host_embeddings``: the frozen input-embedding table in host memory (`qvl train`'s ``host_embeddings``; an
    embedding tied to the LM head stays). ``offload_activations``: the inputs recomputed layers keep go to pinned
    host memory in forward and come back in backward (``activation_offloading``; with gradient checkpointing).
    ``visual_tokens_max``: the most visual tokens a sample holds when the data says (``seq_len`` then being the
    longest packed row it makes, visual tokens included): the budget's worst case (``video_max_frames`` frames of
    ``video_frame_pixels``) above it is not planned for, and not refused for exceeding ``seq_len``.
    """
    m = _shape or resolve_model(model)
    card = _gpu or gpu_from_args(gpu, gpu_mem)
    method = method.lower()
    if method not in ("lora", "qlora", "full"):
        raise QvlError(f"unknown training method {method!r}", fix="use --method lora, qlora or full")
    if zero not in (0, 1, 2, 3):
        raise QvlError(f"unknown ZeRO stage {zero!r}", fix="use --zero 0, 1, 2 or 3")
    if optim not in ("adamw", "adamw8bit", "sgd"):
        raise QvlError(f"unknown optimizer {optim!r}", fix="use adamw, adamw8bit or sgd")
    if batch < 1 or seq_len < 1 or gpus < 1:
        raise QvlError("--batch, --seq-len and --gpus must be at least 1")
    if offload and zero == 0:
        raise QvlError("--offload needs DeepSpeed ZeRO", fix="add --zero 2 or --zero 3")
    if quantization not in (None, *QUANT_BYTES):
        raise QvlError(f"unknown quantization {quantization!r}", fix="use --quantization nf4 or int8")
    if quantization and method == "full":
        raise QvlError("full fine-tuning cannot update quantised weights", fix="--method lora with --quantization, "
                       "or no --quantization")
    if quantization or method == "qlora":  # qlora: LoRA on quantised LLM linears (nf4 unless said)
        method, quantization = "qlora", quantization or "nf4"
    if method == "qlora" and zero == 3:
        raise QvlError("QLoRA does not work with ZeRO-3 here", fix="use --zero 2 or --zero 0")
    if master_bf16 and zero == 0 and method == "full":
        raise QvlError("--master-bf16 is for ZeRO / FSDP2 (their masters are fp32 by default)",
                       fix="add --zero 1, 2 or 3 (FSDP2: --zero 3); without ZeRO full fine-tuning keeps bf16 weights "
                       "and states already (--master-fp32 for fp32)")
    targets = parse_lora_targets(lora_targets)
    if tune_mm_mlp is None:
        tune_mm_mlp = method == "full"
    n = gpus
    settings = dict(method=method, zero=zero, offload=offload, gradient_checkpointing=gradient_checkpointing,
                    master_fp32=master_fp32, master_bf16=master_bf16, fused_ce=fused_ce,
                    recompute_keeps_attention=recompute_keeps_attention,
                    batch=batch, seq_len=seq_len, max_pixels=max_pixels, images_per_sample=images_per_sample,
                    video_max_frames=video_max_frames, video_frame_pixels=video_frame_pixels,
                    tune_mm_vision=tune_mm_vision, tune_mm_mlp=tune_mm_mlp, tune_mm_llm=tune_mm_llm,
                    optim=optim, gpus=gpus)
    if method in ("lora", "qlora"):
        settings.update(lora_r=lora_r, lora_targets=",".join(targets), lora_dropout=lora_dropout)
        if m.is_moe:
            settings.update(lora_experts=lora_experts)
    quantized = set(quantization_targets if isinstance(quantization_targets, (list, tuple, set))
                    else str(quantization_targets).split(","))
    if not quantized <= {"llm", "vision", "merger"} or "llm" not in quantized:
        raise QvlError(f"unknown quantization targets {sorted(quantized)}", fix="llm, and vision / merger if asked "
                       "(e.g. --quantization-targets llm,vision)")
    if quantization:
        settings.update(quantization=quantization, quantization_targets=",".join(sorted(quantized)))
    # a table tied to the LM head, or trained (full fine-tuning of the LLM), stays on the GPU (`qvl train` refuses it)
    host_embeddings = host_embeddings and not m.tied and not (method == "full" and tune_mm_llm)
    offload_activations = offload_activations and gradient_checkpointing
    settings.update(host_embeddings=host_embeddings, offload_activations=offload_activations)

    parts: dict[str, float] = {}
    notes: dict[str, str] = {}
    cpu = 0.0

    # ---- parameters, gradients, optimizer states
    vision_tower = m.params_vision - m.params_merger
    if method == "qlora":
        body_linear = m.params_llm_body  # norms are a rounding error here (and the tower's patch embedding)
        main_merger = m.params_merger - m.deepstack_merger_params  # qvl.train.quantize: DeepStack goes with vision
        parts_q = {"vision": vision_tower + m.deepstack_merger_params, "merger": main_merger}
        q_extra = sum(n for part, n in parts_q.items() if part in quantized)
        w = ((body_linear + q_extra) * QUANT_BYTES[quantization]
             + (m.params_embed + m.params_lm_head + m.params_vision - q_extra) * 2)
        stay = ["embeddings", "lm_head", *(part for part in parts_q if part not in quantized)]
        wnote = (f"{' + '.join(['LLM body', *(p for p in parts_q if p in quantized)])} "
                 f"{(body_linear + q_extra) / 1e9:.2f} B params in "
                 + ("NF4 (4.13 bits)" if quantization == "nf4" else "int8") + f"; {', '.join(stay)} bf16")
    else:
        w = m.params_total * 2
        wnote = f"{m.params_total / 1e9:.2f} B params × 2 bytes (bf16)"
    if host_embeddings:  # the table's bytes move to the host (before ZeRO: `qvl train` runs it in one process)
        w -= m.params_embed * 2
        cpu += m.params_embed * 2
        wnote += f"; the {m.params_embed * 2 / 2**30:.2f} GiB embedding table in host memory"
    if zero == 3:
        w /= n
        wnote += f", ZeRO-3 sharded / {n}"
        if offload:
            cpu += w
            w = 0.0
            wnote += ", offloaded to CPU"
    parts["weights"] = _gib(w)
    notes["weights"] = wnote

    # trainable groups: (params, bytes per param for the weight copy we add, grad bytes, optimizer bytes)
    full_trainable = 0
    if method == "full":
        full_trainable += (m.params_llm if tune_mm_llm else 0)
    full_trainable += m.params_merger if tune_mm_mlp else 0
    full_trainable += vision_tower if tune_mm_vision else 0
    # the experts' adapters come with the LLM's (qvl.train.components.expert_targets: the "llm" target)
    expert_lora = m.is_moe and lora_experts and method in ("lora", "qlora") and bool(llm_lora_targets(targets))
    lora_n = lora_params(m, lora_r, targets, experts=expert_lora) if method in ("lora", "qlora") else 0
    master = master_fp32 and zero == 0 and full_trainable > 0
    adapter_bytes = 2 if master_bf16 and zero == 0 else LORA_ADAPTER_BYTES  # master_weights: bf16 on one GPU / DDP
    adapter_dtype = "bf16" if adapter_bytes == 2 else "fp32"
    if master:  # the trained weights are upcast in place: 2 more bytes each
        w += full_trainable * 2
        parts["weights"] = _gib(w)
        notes["weights"] = wnote + f"; {full_trainable / 1e9:.2f} B trained params in fp32 (+2 bytes)"

    if lora_n:
        parts["LoRA params"] = _gib(lora_n * adapter_bytes)
        on = ",".join(t for t in targets if t in ("q", "k", "v", "o") + LORA_TARGETS_VISUAL) if m.is_moe \
            else ",".join(targets)
        on += f" + {m.moe_experts} experts' gate_up,down" if expert_lora else ""
        notes["LoRA params"] = f"{lora_n / 1e6:.1f} M params (r={lora_r} on {on}) × {adapter_bytes} bytes ({adapter_dtype})"
    # gradients
    g_full = full_trainable * (4 if master else 2)
    g_lora = lora_n * adapter_bytes
    g = g_full + g_lora
    if zero >= 2:
        g /= n
    parts["gradients"] = _gib(g)
    notes["gradients"] = (f"{full_trainable / 1e9:.2f} B full params × {'4 (fp32)' if master else '2 (bf16)'}"
                          if full_trainable else "") + \
        (" + " if full_trainable and lora_n else "") + (f"LoRA × {adapter_bytes} ({adapter_dtype})" if lora_n else "") + \
        (f", ZeRO-{zero} sharded / {n}" if zero >= 2 and n > 1 else "")
    if n > 1 and zero == 0:
        parts["DDP gradient buckets"] = _gib(g)
        notes["DDP gradient buckets"] = "DDP keeps a bucketed copy of the gradients (gradient_as_bucket_view off)"
    # optimizer
    states = {"adamw": 2, "adamw8bit": 2, "sgd": 0}[optim]
    state_bytes = {"adamw": 4, "adamw8bit": 1, "sgd": 4}[optim]
    if zero == 3 and master_bf16 and optim == "adamw" and not offload:  # the bf16 weight partition is the master
        opt_full = full_trainable * (2 + states * 2)
        onote = "bf16 grad partition (the weight partition is the master) + "
    elif zero >= 1 and master_bf16 and optim == "adamw":  # bf16 master + bf16 grad partition + bf16 states
        opt_full = full_trainable * (2 + 2 + states * 2)
        onote = "bf16 master + bf16 grad partition + "
    elif zero >= 1:  # DeepSpeed mixed precision: fp32 master + fp32 grad partition + fp32 (or 8-bit) states
        opt_full = full_trainable * (4 + 4 + states * state_bytes)
        onote = "fp32 master + fp32 grad partition + "
    else:  # torch optimizer: states in the param dtype (bf16, or fp32 master weights)
        opt_full = full_trainable * states * ((4 if master else 2) if optim != "adamw8bit" else 1)
        onote = ""
    opt_lora = lora_n * states * (adapter_bytes if optim != "adamw8bit" else 1)
    opt = opt_full + opt_lora
    if optim == "adamw8bit":  # bitsandbytes: one byte per state (block-wise; its per-block scales are < 2 %)
        onote += f"{states} 8-bit AdamW states × 1 byte"
    else:
        onote += f"{states} {optim} state(s)" + (" in the param dtype" if zero == 0 else
                                                 " in bf16" if master_bf16 and optim == "adamw" else "")
    if zero >= 1:
        opt /= n
        if n > 1:
            onote += f", ZeRO-{zero} sharded / {n}"
        if offload:
            cpu += opt
            opt = 0.0
            onote += ", offloaded to CPU"
    parts["optimizer states"] = _gib(opt)
    notes["optimizer states"] = onote
    if zero >= 2 and n > 1 and (full_trainable or zero == 3):
        buckets = ZERO_BUCKET_ELEMS * 2 * (2 if zero == 3 else 1)
        if zero == 3:  # gathered working set: a couple of layers and the embedding / lm_head
            buckets += max(2 * m.params_llm_body / m.layers, m.params_embed) * 2
        parts["ZeRO buckets / gathered params"] = _gib(buckets)
        notes["ZeRO buckets / gathered params"] = "reduce/allgather buckets (2e8 elements)" + \
            (" + gathered layers / embedding" if zero == 3 else "")

    # ---- activations (per GPU micro-batch)
    tokens = batch * seq_len
    img_tok = visual_tokens_image(m, max_pixels) * images_per_sample if images_per_sample else 0
    vid_tok = visual_tokens_video(m, video_max_frames, video_frame_pixels)
    vis_per_sample = img_tok + vid_tok
    if visual_tokens_max is not None:
        vis_per_sample = min(vis_per_sample, visual_tokens_max)
    if vis_per_sample > seq_len:
        raise QvlError(f"{vis_per_sample:,} visual tokens per sample do not fit in --seq-len {seq_len:,}",
                       fix="raise --seq-len or lower --max-pixels / --video-max-frames")
    patches = batch * vis_per_sample * m.spatial_merge**2
    gqa = batch > 1
    lr = lora_r if lora_n else 0
    layer_full = layer_saved_bytes_per_token(m, lr, targets, lora_dropout, gqa, expert_lora=expert_lora)
    # layer inputs + embeddings; offloaded, two layers' inputs on the GPU at a time (one coming back in backward)
    on_gpu = min(2, m.layers) if offload_activations else m.layers
    ckpt = on_gpu * 2 * m.hidden + 2 * m.hidden
    if gradient_checkpointing:
        llm_saved = tokens * ckpt
        recompute = tokens * (layer_full + 4 * m.hidden)
        notes["LLM activations"] = (f"gradient checkpointing: {m.layers} layer inputs × {2 * m.hidden:,} B per token "
                                    f"({tokens:,} tokens) + one layer recomputed in backward")
        if offload_activations:
            cpu += tokens * (m.layers - on_gpu) * 2 * m.hidden
            notes["LLM activations"] = (f"gradient checkpointing, the {m.layers} layer inputs ({2 * m.hidden:,} B per "
                                        f"token, {tokens:,} tokens) in pinned host memory, {on_gpu} at a time on the "
                                        "GPU + one layer recomputed in backward")
        if recompute_keeps_attention:
            llm_saved += tokens * m.layers * attention_saved_bytes_per_token(m)
            notes["LLM activations"] += (f"; each keeps its attention half "
                                         f"({attention_saved_bytes_per_token(m):,} B per token)")
    else:
        llm_saved = tokens * (m.layers * layer_full + 2 * m.hidden)
        recompute = 0
        notes["LLM activations"] = (f"{m.layers} layers × {layer_full / 1024:.0f} KiB per token × {tokens:,} tokens "
                                    "(no checkpointing)")
    if fused_ce:
        logits = 2 * CE_CHUNK_BYTES + tokens * 10 * m.hidden
        notes["logits / loss"] = (f"fused linear + cross-entropy: logits in chunks of {CE_CHUNK_BYTES / 2**20:.0f} MiB "
                                  f"+ hidden-state gradients ({tokens:,} tokens)")
    else:
        logits = tokens * m.vocab * LOGITS_TRAIN_BYTES + tokens * 10 * m.hidden
        notes["logits / loss"] = (f"{tokens:,} tokens × vocab {m.vocab:,} × {LOGITS_TRAIN_BYTES} B (bf16 logits, "
                                  "fp32 upcast/log-softmax and their grads)")
    vnote = f"{patches:,} patches ({batch} × {vis_per_sample:,} visual tokens × 4)"
    # LoRA on the tower or the merger trains it as far as activations go: its backward needs what its forward kept
    vision_trains = tune_mm_vision or (lora_n > 0 and "vision" in targets)
    merger_trains = tune_mm_mlp or (lora_n > 0 and "merger" in targets)
    if vision_trains:
        if gradient_checkpointing:
            vis_saved = patches * (m.vision_depth * 2 * m.vision_hidden)
            vis_peak_extra = patches * vision_saved_bytes_per_patch(m)
            vnote += ", trained, checkpointed"
        else:
            vis_saved = patches * m.vision_depth * vision_saved_bytes_per_patch(m)
            vis_peak_extra = 0
            vnote += f", trained: {m.vision_depth} blocks kept"
        vis_transient = 0
    else:
        vis_saved, vis_peak_extra = 0, 0
        vis_transient = patches * vision_transient_bytes_per_patch(m)
        vnote += ", frozen: forward working set only"
    merger_saved = batch * vis_per_sample * (1 + m.deepstack) * 6 * m.vision_hidden * m.spatial_merge**2 \
        if merger_trains else 0
    deepstack = batch * vis_per_sample * m.deepstack * 2 * m.hidden
    qlora_dequant = (2 * m.hidden * _mlp_width(m) * 2) if method == "qlora" else 0

    base_saved = llm_saved + vis_saved + merger_saved + deepstack
    backward_peak = max(logits, recompute, vis_peak_extra)
    act_total = max(vis_transient, base_saved + backward_peak) + qlora_dequant
    # report the parts so that they add up to act_total
    if act_total == vis_transient + qlora_dequant and vis_transient > base_saved + backward_peak:
        parts["LLM activations"] = 0.0
        parts["logits / loss"] = 0.0
        parts["vision activations"] = _gib(vis_transient)
        notes["vision activations"] = vnote + " (peak is in the vision forward)"
    else:
        parts["LLM activations"] = _gib(llm_saved + deepstack + (recompute if backward_peak == recompute else 0))
        parts["logits / loss"] = _gib(logits) if backward_peak == logits else 0.0
        if backward_peak != logits:
            notes["logits / loss"] += " (not at the peak: layer recompute is larger)"
        parts["vision activations"] = _gib(vis_saved + merger_saved + (vis_peak_extra if backward_peak ==
                                                                        vis_peak_extra else 0))
        notes["vision activations"] = vnote + ("" if vision_trains else " (transient, before the LLM: "
                                               f"{_gib(vis_transient):.2f} GiB, not at the peak)")
    if qlora_dequant:
        parts["QLoRA dequant buffer"] = _gib(qlora_dequant)
        notes["QLoRA dequant buffer"] = "one dequantised MLP weight pair in bf16"

    alloc = sum(parts.values())
    parts["CUDA context"] = CUDA_CONTEXT_GIB
    notes["CUDA context"] = "CUDA context and library workspaces, outside torch"
    if n > 1:
        parts["NCCL buffers"] = NCCL_GIB
        notes["NCCL buffers"] = f"{n} GPUs"
    parts["allocator reserve"] = alloc * ALLOCATOR_FRACTION
    notes["allocator reserve"] = f"{ALLOCATOR_FRACTION:.0%} of peak allocated (fragmentation)"

    plan = Plan("train", m.name, card.name, card.total_gib, gpus, settings, parts, notes, 0.0, alloc, True, 0.0,
                m.kv_bytes_per_token(2), cpu_ram_gib=_gib(cpu))
    _finish(plan)
    if not card.bf16:
        plan.warnings.append(f"{card.label} has no bf16: training would run in fp16/fp32 (not modelled)")
    if recommend:
        kw = dict(method=method, zero=zero, offload=offload, gradient_checkpointing=gradient_checkpointing,
                  batch=batch, seq_len=seq_len, max_pixels=max_pixels, images_per_sample=images_per_sample,
                  video_max_frames=video_max_frames, video_frame_pixels=video_frame_pixels, lora_r=lora_r,
                  lora_targets=targets, lora_dropout=lora_dropout, tune_mm_vision=tune_mm_vision,
                  tune_mm_mlp=tune_mm_mlp, tune_mm_llm=tune_mm_llm, optim=optim, gpus=gpus, master_fp32=master_fp32,
                  master_bf16=master_bf16, fused_ce=fused_ce, quantization=quantization, lora_experts=lora_experts,
                  quantization_targets=tuple(sorted(quantized)), host_embeddings=host_embeddings,
                  offload_activations=offload_activations, visual_tokens_max=visual_tokens_max)

        def run(**ch) -> Plan | None:
            if visual_tokens_max is not None and "seq_len" in ch:  # a shorter row holds fewer visual tokens too
                ch = {**ch, "visual_tokens_max": min(visual_tokens_max, ch["seq_len"])}
            try:
                return plan_train(m.name, _shape=m, _gpu=card, recommend=False, **{**kw, **ch})
            except QvlError:
                return None

        plan.max_batch_that_fits = _search_max(lambda b: (p := run(batch=b)) is not None and p.fits, 1, 256)
        plan.max_seq_len_that_fits = _search_max(lambda s: (p := run(seq_len=s)) is not None and p.fits,
                                                 1 if visual_tokens_max is not None else max(vis_per_sample, 1),
                                                 MODEL_MAX_LEN)
        plan.recommendations = _train_recommendations(plan, kw, run)
    return plan


def _train_recommendations(plan: Plan, kw: dict, run) -> list[Recommendation]:
    out: list[Recommendation] = []
    s = plan.settings

    def add(text: str, **changes) -> bool:
        p = run(**changes)
        if p is None or not p.fits or any(p.settings.get(k, v) != v for k, v in changes.items()):
            return False  # does not fit, or the planner dropped the change (e.g. a tied embedding table stays)
        flags = " ".join(_flag(k, v) for k, v in changes.items())
        out.append(Recommendation(f"{flags}: {text} → {p.total_gib:.1f} GiB", changes, round(p.total_gib, 2), True))
        return True

    if plan.fits:
        if plan.max_batch_that_fits and plan.max_batch_that_fits > s["batch"]:
            out.append(Recommendation(f"largest --batch that fits at --seq-len {s['seq_len']:,}: "
                                      f"{plan.max_batch_that_fits}", {"batch": plan.max_batch_that_fits}, None, True))
        if plan.max_seq_len_that_fits and plan.max_seq_len_that_fits > s["seq_len"]:
            out.append(Recommendation(f"largest --seq-len that fits at --batch {s['batch']}: "
                                      f"{plan.max_seq_len_that_fits:,}", {"seq_len": plan.max_seq_len_that_fits},
                                      None, True))
        return out
    # single changes, cheapest in quality/speed first
    if not s["fused_ce"]:
        add("the loss in row chunks, never tokens × the vocabulary (`qvl train`'s default fused_cross_entropy)",
            fused_ce=True)
    if s["batch"] > 1 and plan.max_batch_that_fits:
        b = plan.max_batch_that_fits
        acc = math.ceil(s["batch"] / b)
        add(f"same tokens per step with gradient accumulation {acc}", batch=b)
    if not s["gradient_checkpointing"]:
        add("recompute layer activations in backward (~30% slower)", gradient_checkpointing=True)
    if s["optim"] == "adamw":
        add("8-bit optimizer states (bitsandbytes)", optim="adamw8bit")
    if s["method"] in ("lora", "qlora") and s["zero"] == 0 and not s["master_bf16"]:
        add("LoRA adapters, their gradients and AdamW states in bf16 (updates below bf16's resolution are lost)",
            master_bf16=True)
    if s["method"] in ("lora", "qlora") and s.get("lora_r", 0) > 8:  # the largest rank that fits, halving
        # (MoE with the experts' LoRA: r=64 on 30B-A3B is 2.5 B adapter params, 38 GiB in fp32 with AdamW)
        r = s["lora_r"] // 2
        while r >= 8 and not add("a lower LoRA rank (fewer adapter params, their gradients and optimizer states)",
                                 lora_r=r):
            r //= 2
    if not s["host_embeddings"] and s["gpus"] == 1:
        add("the frozen input-embedding table in host memory", host_embeddings=True)
    if s["gradient_checkpointing"] and not s["offload_activations"] and s["gpus"] == 1:
        add("recomputed layers' inputs in pinned host memory (activation offloading; a copy each way per layer)",
            offload_activations=True)
    if s["tune_mm_vision"]:
        add("freeze the vision tower", tune_mm_vision=False)
    if s["max_pixels"] > 200_704 and s["images_per_sample"]:
        add("fewer visual tokens per image", max_pixels=200_704)
    if s["method"] == "full":
        add("LoRA instead of full fine-tuning", method="lora")
    if s["method"] == "lora":
        add("4-bit base weights (QLoRA)", method="qlora")
    if s["gpus"] > 1 and s["zero"] < 3:
        for z in (2, 3):
            if z > s["zero"] and (s["method"] != "qlora" or z < 3) and add("shard across GPUs", zero=z):
                break
    if s["zero"] >= 1 and s["method"] == "full" and s["optim"] == "adamw" and not s["master_bf16"]:
        add("bf16 master weights and AdamW states (8 instead of 16 bytes per trained parameter; updates below "
            "bf16's resolution are lost)", master_bf16=True)
    if s["zero"] >= 2 and not s["offload"]:
        add("optimizer states (and ZeRO-3 params) in CPU RAM; slower", offload=True)
    if plan.max_seq_len_that_fits and plan.max_seq_len_that_fits < s["seq_len"]:
        sl = plan.max_seq_len_that_fits
        sl = sl // 128 * 128 if sl >= 256 else sl
        add("largest sequence that fits (samples longer than this are cut)", seq_len=sl)
    if not out:  # combinations
        small_states = {"optim": "adamw8bit", "master_bf16": True, "fused_ce": True} if s["zero"] == 0 else {}
        table_moves = bool(getattr(run(host_embeddings=True), "settings", {}).get("host_embeddings"))
        host = {"host_embeddings": table_moves, "offload_activations": True} if s["gpus"] == 1 else {}
        for ch in ({"method": "qlora", "gradient_checkpointing": True},
                   {"method": "qlora", "gradient_checkpointing": True, **small_states},
                   {"method": "qlora", "gradient_checkpointing": True, **small_states, **host},
                   {"method": "qlora", "gradient_checkpointing": True, **small_states, **host,
                    "quantization_targets": "llm,merger,vision"},
                   {"method": "qlora", "gradient_checkpointing": True, "batch": 1},
                   {"method": "qlora", "gradient_checkpointing": True, "batch": 1, "max_pixels": 200_704},
                   {"method": "lora", "zero": 3, "offload": True, "gradient_checkpointing": True, "batch": 1}):
            ch = {k: v for k, v in ch.items() if s.get(k) != v}
            if ch and add("combined", **ch):
                break
    if not any(r.fits for r in out):
        out.append(Recommendation("nothing tried fits on this card: use a larger GPU, more GPUs with --zero 3, "
                                  "or a smaller model", {}, None, False))
    return out


def _flag(key: str, value) -> str:
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"--no-{key.replace('_', '-')}"
    if isinstance(value, int) and value >= 10_000:
        return f"{name} {value:_}".replace("_", "")
    return f"{name} {value}"
