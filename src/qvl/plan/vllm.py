"""vLLM's KV-cache budget, term by term, per vLLM version range (what ``qvl plan serve --backend vllm`` and the
serve preflight use).

vLLM sizes its KV cache at start-up as

    available KV = gpu_memory_utilization × card − weights − non-torch increase − profiling peak [− CUDA graphs]

where the profiling peak is the largest torch allocation of a dummy run (vision encoder on the largest item, a
forward of ``max_num_batched_tokens`` tokens, the sampler on ``max_num_seqs`` rows). Which terms exist and how
large they are changed across versions; each range is an :class:`Accounting`. The constants are fitted to the
start-up logs recorded in ``tests/plan/vllm_logs.json`` (each with its thread URL); the table in docs/plan.md
is generated from that file. Where the logs disagree the constant is taken at the end that predicts *less* KV
(the side that does not crash), and the spread goes into the margin the verdict prints.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from qvl.plan.gpus import GIB
from qvl.plan.model import ModelShape

# --- constants fitted to the start-up logs (tests/plan/vllm_logs.json) ---------------------------------------
# Non-torch increase during profiling on one GPU (cuBLAS/cuDNN workspaces): logged 0.03-0.43 GiB (V0:
# vllm-project/vllm#10517, #13061, #15815, #16570; V1 v0.11-v0.19: 0.13-0.25, llm-d-incubation/llm-d-planner);
# the top of that range. (The 1.79 / 3.58 GiB of the v0.6.5 development build in vllm-project/vllm#10511 is
# an outlier of that build.) With tensor parallelism V1 adds its all-reduce buffers: see Accounting.
NON_TORCH_GIB = 0.45
NON_TORCH_SPREAD_GIB = 0.4
# The dummy forward of max_num_batched_tokens tokens, per token: fused gate_up output (2·I·2 B) + SiluAndMul
# output (I·2 B) + residual, normed and output hidden states (3·h·2 B) = 6·I + 6·h. Llama-3.1-8B on an RTX 3090
# (vllm-project/vllm#10517, V0, chunked prefill off so max_num_batched_tokens = max_model_len) logged 2.07 GiB
# at 20,000 tokens and 2.99 GiB at 29,000: 111 kB/token; 6·14336 + 6·4096 = 110.6 kB.
FORWARD_MLP_BYTES = 6
FORWARD_HIDDEN_BYTES = 6
FORWARD_SPREAD = 0.10
# Vision encoder on the profiled items: per patch the working set of qvl.plan.memory.vision_transient_bytes_per_patch,
# NOT divided by tensor parallelism (vLLM gathers q/k/v to all heads in the vision tower, and Qwen3-VL's
# --mm-encoder-tp-mode data replicates it). Qwen2.5-VL-architecture logs for one 16,384-token image (65,536
# patches): 2.51 GiB at TP 4 (Qwen2.5-VL-72B, vllm-project/vllm#16570, V0 0.8.3), 2.49 GiB at TP 1 (MiMo-VL-7B,
# vLLM 0.19, llm-d-incubation/llm-d-planner#205), and at most 2.39 GiB with the non-torch memory (Qwen2.5-VL-7B on
# an L4, vLLM 0.9.0.1, tsailiming/openshift-ai-bootstrap): 36-41 kB/patch against 40.5 kB counted (the fp32 pixel
# input, not a bf16 copy besides it: the tower rebinds that before its first block). No Qwen3-VL log with its
# settings and an image profile could be read (the one read profiled a video: tests/plan/vllm_logs.json,
# qwen3-vl-30b-a3b-4x3090-tp4-v0.11): the spread is wider than the logs'.
ENCODER_SPREAD = 0.25
# CUDA graph pools: vLLM >= 0.21 estimates them before sizing the KV cache ("CUDA graph memory profiling is
# enabled (default since v0.21.0)"); logged pools 0.09-1.85 GiB (noonghunna/club-3090#1087, #1139,
# vllm-project/vllm#50722, #39559; 0.51-1.85 GiB over 58 v0.19 runs, llm-d-incubation/llm-d-planner#205).
# ~0.02 GiB per decoder layer: 0.72 GiB for a 36-layer model.
CUDAGRAPH_GIB_PER_LAYER = 0.02
CUDAGRAPH_SPREAD = 0.5
# The encoder cache budget V1 profiles with: a fixed 16,384 tokens, made configurable (same default) in
# vllm-project/vllm#34051; the profile fills it with as many of the largest items as fit (#38459: regardless of
# limit_mm_per_prompt unless a modality is set to 0). The largest image is the processor's maximum, whatever
# max_model_len is (vllm-project/vllm#27992).
ENCODER_BUDGET_TOKENS = 16_384
V0_CHUNKED_PREFILL_ABOVE = 32_768  # V0 turned chunked prefill on above this max_model_len


@dataclass(frozen=True)
class Accounting:
    """How one vLLM version range sizes its KV cache."""

    name: str  # e.g. "V1 engine, >= 0.21"
    engine: str  # "v0" or "v1"
    graphs_subtracted: bool  # CUDA graph memory estimated and taken from the KV budget before allocation
    encoder_budget: bool  # V1: the encoder profile is sized by the encoder cache budget
    sampler_bytes: int  # sampler dummy run, bytes per row per vocabulary entry
    sampler_spread: float
    tp_non_torch_gib: float  # non-torch increase with tensor parallelism > 1 (all-reduce buffers)
    warning: str = ""
    unexplained_spread_gib: float = 0.0  # memory the logs show taken before the KV cache that no term explains


# Sampler dummy run on max_num_seqs rows × vocabulary (fp32 logits, softmax, log-probs, sort values and int64
# indices for top-p/top-k):
#   V0: 1.26 GiB for 256 × 128,256 (Llama-3-8B, vllm-project/vllm#10511: 41 B), <= 1.26 GiB for 256 × 152,064
#       (Qwen2.5-32B TP2, #15815: <= 35 B), 0.61 GiB more for 256 than 128 rows (#9003: up to 56 B) -> 48 ± 30 %.
#   V1 up to 0.16: 1,024 rows on an H100, 4.76 GiB for vocab 128,256, 5.56 / 5.64 for 151,936, 7.38 for 201,088
#       (v0.11, llm-d-incubation/llm-d-planner docs/empirical-vllm-memory-results.md), 5.64 GiB for Qwen3-14B on
#       v0.15 and v0.16 (llm-d-planner#205): 38.4-39.6 B -> 40 ± 10 %.
#   V1 0.17 and later: 2.23 GiB for Qwen3-14B on v0.17/v0.18, 1.89 (vocab 128,256), 2.21 (151,936-152,064),
#       3.62-3.99 (256,000-262,144) on v0.19 (llm-d-planner#205): 15.2-15.9 B -> 16 ± 10 %.
# Non-torch with TP > 1: 0.25-0.43 GiB in V0 (#13061, #15815, #16570), 0.54-0.55 on v0.11, 2.06-2.17 on v0.19
# (llm-d-planner#205; v0.18 raised the TP-1 figure too, 0.13 -> 0.25).
ACCOUNTINGS = {
    "v0": Accounting("V0 engine (< 0.8, or VLLM_USE_V1=0)", "v0", False, False, 48, 0.30, NON_TORCH_GIB),
    # 0.8 – 0.9.0 counted allocator-cached memory as non-torch memory (vllm-project/vllm#19312): 5.6 GiB more
    # than the terms on an L40S (Llama-3.1-8B, 0.8.4, vllm-project/vllm#17122), 4.4 GiB on an H100
    # (Qwen2.5-VL-7B, 0.8.2, QwenLM/Qwen3-VL#1057), none on an L4 (Qwen2.5-VL-7B, 0.9.0.1): not a constant, so
    # it widens the margin instead of moving the estimate.
    "v1-early": Accounting("V1 engine, 0.8 – 0.9.0", "v1", False, True, 40, 0.10, 0.6,
                           warning="vLLM 0.8 – 0.9.0 (V1) counted allocator-cached memory as non-torch memory "
                                   "(replaced in vllm-project/vllm#19312): it may start with less KV cache than "
                                   "planned, or refuse a low --gpu-memory-utilization",
                           unexplained_spread_gib=5.6),
    "v1": Accounting("V1 engine, 0.9.1 – 0.16", "v1", False, True, 40, 0.10, 0.6),
    "v1-0.17": Accounting("V1 engine, 0.17 – 0.20", "v1", False, True, 16, 0.10, 2.3),
    "v1-graphs": Accounting("V1 engine, >= 0.21", "v1", True, True, 16, 0.10, 2.3),
}
LATEST = "v1-graphs"
_VERSION = re.compile(r"^v?(\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    m = _VERSION.match(str(text).strip())
    return (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)) if m else None


def accounting_for(version: str | None = None, engine: str | None = None) -> Accounting:
    """The accounting of a vLLM version ('0.11.0', 'v0.8.5.post1'); None: the newest. ``engine='v0'`` forces the
    V0 engine (VLLM_USE_V1=0, or a model V1 did not support yet)."""
    v = parse_version(version) if version else None
    if engine == "v0" or (v is not None and v < (0, 8, 0)):
        return ACCOUNTINGS["v0"]
    if v is None or v >= (0, 21, 0):
        return ACCOUNTINGS[LATEST]
    if v < (0, 9, 1):
        return ACCOUNTINGS["v1-early"]
    return ACCOUNTINGS["v1" if v < (0, 17, 0) else "v1-0.17"]


def installed_vllm_version() -> str | None:
    """The installed vLLM's version (package metadata only: vLLM is not imported), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("vllm")
    except PackageNotFoundError:
        return None


def default_batching(acct: Accounting, card_gib: float, max_model_len: int) -> tuple[int, int]:
    """vLLM's API-server defaults: (max_num_seqs, max_num_batched_tokens)."""
    if acct.engine == "v0":
        tokens = max(max_model_len, 2048) if max_model_len <= V0_CHUNKED_PREFILL_ABOVE else 2048
        return 256, tokens
    return (1024, 8192) if card_gib >= 70 else (256, 2048)


def forward_bytes_per_token(m: ModelShape, tp: int) -> float:
    """Dummy-forward working set per token on one GPU: the MLP (6·I/tp) or attention projections, whichever is
    larger, plus the hidden states (6·h)."""
    mlp = m.moe_topk * m.moe_intermediate if m.is_moe else m.intermediate
    attn = 2 * (2 * m.q_dim + 2 * m.kv_dim)
    return max(FORWARD_MLP_BYTES * mlp, attn) / tp + FORWARD_HIDDEN_BYTES * m.hidden


@dataclass
class Budget:
    """vLLM's KV budget on one GPU, in GiB, and what each term is."""

    accounting: Accounting
    requested_gib: float
    parts: dict[str, float] = field(default_factory=dict)  # subtracted from the request (graphs only if so)
    notes: dict[str, str] = field(default_factory=dict)
    graphs_gib: float = 0.0  # CUDA graph pools (subtracted or, before 0.21, taken from the margin)
    kv_available_gib: float = 0.0
    margin_gib: float = 0.0  # ± on kv_available_gib
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0


def budget(m: ModelShape, *, card_gib: float, utilization: float, tp: int, max_model_len: int,
           mm_item_tokens: int, max_num_seqs: int | None, max_num_batched_tokens: int | None,
           enforce_eager: bool, acct: Accounting, weights_bytes: float, vision_patch_bytes: int,
           skip_mm_profiling: bool = False) -> Budget:
    """Every term of vLLM's KV budget for one GPU (``vision_patch_bytes``: the vision encoder's working set per
    patch, ``qvl.plan.memory.vision_transient_bytes_per_patch``)."""
    seqs, tokens = default_batching(acct, card_gib, max_model_len)
    seqs = max_num_seqs or seqs
    tokens = max_num_batched_tokens or tokens
    b = Budget(acct, card_gib * utilization, max_num_seqs=seqs, max_num_batched_tokens=tokens)

    # vision encoder profile: the processor's largest item (not capped by max_model_len); V1 fills the encoder
    # budget with as many as fit, V0 puts one in each of min(max_num_seqs, tokens // item) dummy sequences (>= 1)
    vision = enc_cache = 0.0
    # (--skip-mm-profiling, vllm-project/vllm#22950, or --limit-mm-per-prompt with every modality 0: no encoder run)
    item = mm_item_tokens if m.vision_hidden and not skip_mm_profiling else 0
    items = 0
    if item:
        if acct.encoder_budget:
            items = max(1, max(ENCODER_BUDGET_TOKENS, tokens) // item)
        else:
            items = max(1, min(seqs, tokens // item))
        vision = items * item * m.spatial_merge**2 * vision_patch_bytes  # not sharded by TP (see ENCODER_SPREAD)
        enc_cache = items * item * m.hidden * 2 * (1 + m.deepstack)
    forward = tokens * forward_bytes_per_token(m, tp)
    sampler = seqs * m.vocab * acct.sampler_bytes
    phases = {"vision": vision, "forward": enc_cache + forward, "sampler": enc_cache + sampler}
    which = max(phases, key=phases.get)
    peak = phases[which]
    spread = {"vision": ENCODER_SPREAD, "forward": FORWARD_SPREAD, "sampler": acct.sampler_spread}[which]
    graphs = 0.0 if enforce_eager else CUDAGRAPH_GIB_PER_LAYER * m.layers
    non_torch = acct.tp_non_torch_gib if tp > 1 else NON_TORCH_GIB

    b.parts["weights"] = weights_bytes / GIB
    b.parts["vLLM non-torch memory"] = non_torch
    b.notes["vLLM non-torch memory"] = ("non-torch increase during profiling (cuBLAS workspaces …; 0.03–0.43 GiB "
                                        "logged on one GPU)" if tp == 1 else
                                        f"non-torch increase during profiling with TP {tp} (all-reduce buffers; "
                                        f"{acct.name})")
    b.parts["vLLM profiling peak"] = peak / GIB
    label = {"vision": f"vision encoder on {items}× a {item:,}-token item",
             "forward": f"forward of {tokens:,} tokens", "sampler": f"sampler on {seqs:,} rows × {m.vocab:,}"}
    b.notes["vLLM profiling peak"] = (
        f"max(vision encoder {vision / GIB:.2f} GiB, forward of {tokens:,} tokens {(enc_cache + forward) / GIB:.2f} "
        f"GiB, sampler {seqs:,}×{m.vocab:,}×{acct.sampler_bytes} B {(enc_cache + sampler) / GIB:.2f} GiB): "
        f"{label[which]}")
    b.graphs_gib = graphs
    b.notes["CUDA graphs"] = ("disabled (--enforce-eager)" if enforce_eager else
                              f"~{CUDAGRAPH_GIB_PER_LAYER} GiB × {m.layers} layers; " +
                              ("estimated and taken from the KV budget (vLLM >= 0.21)" if acct.graphs_subtracted else
                               "captured after the KV cache, from the (1 − utilisation) margin (vLLM < 0.21)"))
    subtracted = sum(b.parts.values()) + (graphs if acct.graphs_subtracted else 0.0)
    b.kv_available_gib = b.requested_gib - subtracted
    terms = [NON_TORCH_SPREAD_GIB, spread * peak / GIB, 0.01 * b.parts["weights"], acct.unexplained_spread_gib]
    if acct.graphs_subtracted:
        terms.append(CUDAGRAPH_SPREAD * graphs)
    b.margin_gib = math.sqrt(sum(t * t for t in terms))
    return b
