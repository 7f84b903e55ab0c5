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
# Non-torch increase during profiling (cuBLAS/cuDNN workspaces, NCCL's own buffers are allocated before the
# baseline): logged 0.03-0.43 GiB on dedicated TP1-TP4 cards (vllm-project/vllm#10517, #13061, #15815, #16570);
# the top of that range. (The 1.79 / 3.58 GiB of the v0.6.5 development build in vllm-project/vllm#10511 is
# an outlier of that build.)
NON_TORCH_GIB = 0.45
NON_TORCH_SPREAD_GIB = 0.4
# The dummy forward of max_num_batched_tokens tokens, per token: fused gate_up output (2·I·2 B) + SiluAndMul
# output (I·2 B) + residual, normed and output hidden states (3·h·2 B) = 6·I + 6·h. Llama-3.1-8B on an RTX 3090
# (vllm-project/vllm#10517, V0, chunked prefill off so max_num_batched_tokens = max_model_len) logged 2.07 GiB
# at 20,000 tokens and 2.99 GiB at 29,000: 111 kB/token; 6·14336 + 6·4096 = 110.6 kB.
FORWARD_MLP_BYTES = 6
FORWARD_HIDDEN_BYTES = 6
FORWARD_SPREAD = 0.10
# Sampler dummy run on max_num_seqs rows × vocabulary (fp32 logits, softmax, log-probs, sort values and int64
# indices for top-p/top-k). V0 logs: 1.26 GiB for 256 × 128,256 (Llama-3-8B, vllm-project/vllm#10511: 41 B),
# ≤ 1.26 GiB for 256 × 152,064 (Qwen2.5-32B TP2, #15815: ≤ 35 B), 0.61 GiB more for 256 than 128 rows
# (vllm-project/vllm#9003: up to 56 B) -> 48. V1 (the sampler was reworked): 5.66 GiB peak for 1,024 × 248,320
# (vllm-project/vllm#50722, v0.2x: 24 B) -> 32 (one log; the margin covers it).
SAMPLER_BYTES = {"v0": 48, "v1": 32}
SAMPLER_SPREAD = 0.30
# Vision-encoder working set spread (no Qwen-VL start-up log with the settings visible could be read: see
# docs/plan.md "vLLM accounting against start-up logs").
ENCODER_SPREAD = 0.35
# CUDA graph pools: vLLM >= 0.21 estimates them before sizing the KV cache ("CUDA graph memory profiling is
# enabled (default since v0.21.0)"); logged pools 0.09-1.34 GiB (noonghunna/club-3090#1087, #1139,
# vllm-project/vllm#50722, #39559). ~0.02 GiB per decoder layer: 0.72 GiB for a 36-layer model.
CUDAGRAPH_GIB_PER_LAYER = 0.02
CUDAGRAPH_SPREAD = 0.5
# The encoder cache budget V1 profiles with: a fixed 16,384 tokens, made configurable (same default) in
# vllm-project/vllm#34051; the profile fills it with as many of the largest items as fit (#38459: regardless of
# limit_mm_per_prompt unless a modality is set to 0).
ENCODER_BUDGET_TOKENS = 16_384
V0_CHUNKED_PREFILL_ABOVE = 32_768  # V0 turned chunked prefill on above this max_model_len


@dataclass(frozen=True)
class Accounting:
    """How one vLLM version range sizes its KV cache."""

    name: str  # e.g. "V1, >= 0.21"
    engine: str  # "v0" or "v1"
    graphs_subtracted: bool  # CUDA graph memory estimated and taken from the KV budget before allocation
    encoder_budget: bool  # V1: the encoder profile is sized by the encoder cache budget
    note: str = ""


ACCOUNTINGS = {
    "v0": Accounting("V0 engine (< 0.8, or VLLM_USE_V1=0)", "v0", False, False,
                     "profile = forward of max_num_batched_tokens (= max_model_len without chunked prefill) and the "
                     "sampler; CUDA graphs captured afterwards, from the (1 − utilisation) margin"),
    "v1": Accounting("V1 engine, 0.9.1 – 0.20", "v1", False, True,
                     "encoder profile on the 16,384-token encoder budget, forward, sampler; CUDA graphs captured "
                     "after the KV cache, from the (1 − utilisation) margin"),
    "v1-graphs": Accounting("V1 engine, >= 0.21", "v1", True, True,
                            "as 0.9.1 – 0.20, and the CUDA graph estimate is taken from the KV budget"),
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
    if v is not None and v < (0, 21, 0):
        return ACCOUNTINGS["v1"]
    return ACCOUNTINGS[LATEST]


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
           enforce_eager: bool, acct: Accounting, weights_bytes: float, vision_patch_bytes: int) -> Budget:
    """Every term of vLLM's KV budget for one GPU (``vision_patch_bytes``: the vision encoder's working set per
    patch, ``qvl.plan.memory.vision_transient_bytes_per_patch``)."""
    seqs, tokens = default_batching(acct, card_gib, max_model_len)
    seqs = max_num_seqs or seqs
    tokens = max_num_batched_tokens or tokens
    b = Budget(acct, card_gib * utilization, max_num_seqs=seqs, max_num_batched_tokens=tokens)

    # vision encoder profile
    vision = enc_cache = 0.0
    items = 0
    item = min(mm_item_tokens, max_model_len) if m.vision_hidden else 0
    if item:
        enc_tokens = max(ENCODER_BUDGET_TOKENS, tokens) if acct.encoder_budget else item
        items = max(1, enc_tokens // item) if acct.encoder_budget else 1
        patches = items * item * m.spatial_merge**2
        vision = patches * vision_patch_bytes / tp
        enc_cache = items * item * m.hidden * 2 * (1 + m.deepstack) / tp
    forward = tokens * forward_bytes_per_token(m, tp)
    sampler = seqs * m.vocab * SAMPLER_BYTES[acct.engine]
    phases = {"vision": vision, "forward": enc_cache + forward, "sampler": enc_cache + sampler}
    which = max(phases, key=phases.get)
    peak = phases[which]
    spread = {"vision": ENCODER_SPREAD, "forward": FORWARD_SPREAD, "sampler": SAMPLER_SPREAD}[which]
    graphs = 0.0 if enforce_eager else CUDAGRAPH_GIB_PER_LAYER * m.layers

    b.parts["weights"] = weights_bytes / GIB
    b.parts["vLLM non-torch memory"] = NON_TORCH_GIB
    b.notes["vLLM non-torch memory"] = "non-torch increase during profiling (cuBLAS workspaces …), 0.03–0.43 GiB logged"
    b.parts["vLLM profiling peak"] = peak / GIB
    label = {"vision": f"vision encoder on {items}× a {item:,}-token item",
             "forward": f"forward of {tokens:,} tokens", "sampler": f"sampler on {seqs:,} rows × {m.vocab:,}"}
    b.notes["vLLM profiling peak"] = (
        f"max(vision encoder {vision / GIB:.2f} GiB, forward of {tokens:,} tokens {(enc_cache + forward) / GIB:.2f} "
        f"GiB, sampler {seqs:,}×{m.vocab:,}×{SAMPLER_BYTES[acct.engine]} B {(enc_cache + sampler) / GIB:.2f} GiB): "
        f"{label[which]}")
    b.graphs_gib = graphs
    b.notes["CUDA graphs"] = ("disabled (--enforce-eager)" if enforce_eager else
                              f"~{CUDAGRAPH_GIB_PER_LAYER} GiB × {m.layers} layers; " +
                              ("estimated and taken from the KV budget (vLLM >= 0.21)" if acct.graphs_subtracted else
                               "captured after the KV cache, from the (1 − utilisation) margin (vLLM < 0.21)"))
    subtracted = sum(b.parts.values()) + (graphs if acct.graphs_subtracted else 0.0)
    b.kv_available_gib = b.requested_gib - subtracted
    terms = [NON_TORCH_SPREAD_GIB, spread * peak / GIB, 0.01 * b.parts["weights"]]
    if acct.graphs_subtracted:
        terms.append(CUDAGRAPH_SPREAD * graphs)
    b.margin_gib = math.sqrt(sum(t * t for t in terms))
    return b
