"""The fast decode path of the transformers backend: a slot KV cache and a captured decode step.

``model.generate`` re-runs Python over every module for every token and grows its cache by
concatenation; at batch 1 on an H100 that is ~6 % of what the memory bandwidth allows. Here:

* **Prefill** runs a request batch once (vision encoder, DeepStack, mRoPE positions from
  ``qvl.data.packing.sample_positions``), keeps only the last position's logits, and puts each request's
  keys/values into its **slot** of a pre-allocated cache: by default as one packed row through the decode step's
  own pieces (``qvl.infer.packed_prefill``), else (:meth:`DecodeModel.prefill`) through the Hugging Face forward
  over the padded batch, its cache copied into the slots.
* **Decode** is our own step over the same weights: RMSNorm, fused q/k/v and gate/up matrices
  (the modules' weights become views of the fused tensors, so no memory is added), q/k norms,
  RoPE, the new key/value written at each row's own position, attention over the first ``Lb``
  cache entries with a per-row length mask, the MLP (or the routed experts), the final norm and ``lm_head``.
  New tokens are text, whose three mRoPE components are equal, so the rotation is the plain 1-D one at
  ``position + rope_delta`` (rope_delta = the request's largest prompt position + 1 - its length).
* **Mixture-of-experts layers** (Qwen3-VL-30B-A3B, 235B-A22B): the router as the Hugging Face block computes it
  (softmax in float32, top-k, the k weights renormalised to sum to 1, cast back to the model dtype; no shared
  experts), then only the selected experts' weights are read, straight from the experts' 3-D parameters (no
  copy): either a grouped GEMM over the (token, expert) pairs sorted by expert (``torch._grouped_mm``; each
  selected expert is read once, whatever the batch) or a gathered multiply-and-reduce per pair (one fused kernel
  under ``torch.compile``; an expert chosen by two rows is read twice), or, for a few rows on a GPU, Triton
  kernels for the router's top-k and the experts (:mod:`qvl.infer.moe_kernels`: three launches a layer instead
  of the sort, search, scatter and grouped GEMM's). All have fixed shapes and no host sync, so they compile and
  capture like the dense step; ``DecodeModel.fused_max_rows`` and ``gather_max_rows`` (default
  :data:`EXPERTS_FUSED_MAX_ROWS`, :data:`EXPERTS_GATHER_MAX_ROWS`) pick between them per batch bucket. The k
  weighted outputs of a token are summed in top-k order, as the Hugging Face grouped-GEMM path does.
* On CUDA the per-layer pieces are compiled by ``torch.compile`` (dynamic shapes: one compile for
  every batch and length) and the whole step is captured in a CUDA graph for each (batch bucket,
  length bucket) pair, so a decode step is one graph launch. On CPU it runs eagerly (tests).

Rows are cache slots: a batch of ``B`` rows reads slots ``0..B-1``; free slots inside that range
compute garbage that nobody reads. Qwen3-VL language models (dense or MoE) without biases qualify
(:func:`supports`); anything else (unmerged adapters, shared experts) uses ``model.generate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qvl.infer import triton_support

log = logging.getLogger("qvl.infer")


def _parts(model):
    """(conditional-generation model, its text model, lm_head) through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", None)
    text = getattr(inner, "language_model", None)
    return base, text, getattr(base, "lm_head", None)


def supports(model) -> str | None:
    """None when the fast path can run ``model``, else why not (said once in the server log)."""
    base, text, head = _parts(model)
    if text is None or head is None or not hasattr(text, "layers"):
        return f"{type(base).__name__} is not a Qwen3-VL conditional-generation model"
    cfg = text.config
    if getattr(cfg, "attention_bias", False):
        return "attention biases are not supported by the fast path"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act} is not supported by the fast path"
    for layer in text.layers:
        why = _mlp_kind(getattr(layer, "mlp", None))[1]
        if why:
            return why
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if type(getattr(layer.self_attn, name)) is not torch.nn.Linear:
                return "adapter-wrapped projections use model.generate (merge the adapter first)"
    if getattr(cfg, "rope_parameters", {}).get("rope_type", "default") != "default":
        return "scaled RoPE variants use model.generate"
    return None


def _mlp_kind(mlp) -> tuple[str | None, str | None]:
    """("dense" | "moe", None) for an MLP the step can run, else (None, why not)."""
    if mlp is None:
        return None, "a decoder layer without an MLP"
    if all(type(getattr(mlp, n, None)) is torch.nn.Linear for n in ("gate_proj", "up_proj", "down_proj")):
        return "dense", None
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None, "adapter-wrapped projections use model.generate (merge the adapter first)"
    experts, gate = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    if experts is None or gate is None:
        return None, f"the MLP {type(mlp).__name__} is not supported by the fast path"
    if any(hasattr(mlp, n) for n in ("shared_expert", "shared_experts", "shared_expert_gate")):
        return None, "shared experts are not supported by the fast path"
    plain = (type(getattr(experts, "gate_up_proj", None)) is torch.nn.Parameter
             and type(getattr(experts, "down_proj", None)) is torch.nn.Parameter
             and type(getattr(gate, "weight", None)) is torch.nn.Parameter and hasattr(gate, "top_k"))
    if not plain or hasattr(experts, "base_layer") or hasattr(gate, "base_layer"):
        return None, "adapter-wrapped experts or router use model.generate (merge the adapter first)"
    if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
        return None, "expert biases or transposed expert weights are not supported by the fast path"
    return "moe", None


@dataclass
class MoEWeights:
    """A sparse MoE block's weights, as the model holds them (views, nothing copied)."""

    router: torch.Tensor  # (experts, hidden)
    gate_up: torch.Tensor  # (experts, 2 * moe_intermediate, hidden): gate rows, then up rows
    down: torch.Tensor  # (experts, hidden, moe_intermediate)
    top_k: int


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    wqkv: torch.Tensor
    qn: torch.Tensor
    kn: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    mlp: tuple  # dense: (fused gate/up, down); MoE: (router, experts' gate_up, experts' down)
    top_k: int = 0  # experts per token; 0: a dense MLP

    @classmethod
    def of(cls, layer) -> LayerWeights:
        """The step's view of a decoder layer: q/k/v and gate/up fused (the modules' weights become views)."""
        at, mlp = layer.self_attn, layer.mlp
        common = (layer.input_layernorm.weight.data, _fuse([at.q_proj, at.k_proj, at.v_proj]),
                  at.q_norm.weight.data, at.k_norm.weight.data, at.o_proj.weight.data,
                  layer.post_attention_layernorm.weight.data)
        if _mlp_kind(mlp)[0] == "moe":
            moe = MoEWeights(mlp.gate.weight.data, mlp.experts.gate_up_proj.data, mlp.experts.down_proj.data,
                             int(mlp.gate.top_k))
            return cls(*common, (moe.router, moe.gate_up, moe.down), moe.top_k)
        return cls(*common, (_fuse([mlp.gate_proj, mlp.up_proj]), mlp.down_proj.weight.data))


# Batch buckets up to this many rows run the MoE experts as gathered multiply-and-reduce (every row reads its own
# k experts: no sort, one fused kernel); larger ones as a grouped GEMM over the pairs sorted by expert (each
# selected expert read once). Grouped won at every size measured: the 30B-A3B captured step took 7.15 ms grouped
# against 7.50 gathered at 1 row, 25.2 against 99.4 ms at 32 (H100, 2026-12-05, bench/results/decode_moe_h100.json).
# Gathering stays where the grouped GEMM does not compile (non-bf16 weights) or capture.
EXPERTS_GATHER_MAX_ROWS = 0
# Batch buckets up to this many rows run the MoE layer's router top-k and experts as qvl.infer.moe_kernels' Triton
# kernels (on CUDA). The 30B-A3B captured step at 1 row: 4.45 ms fused against 6.86 grouped and 7.24 gathered (H100,
# 2026-12-06, bench/results/decode_moe_fused_down_h100.json). Fused reads each (row, expert) pair's expert whole,
# grouped each chosen expert once, so rows that route alike favour grouped. Steps of rows of random tokens (random
# weights: near-uniform routing, fused's best case), fused against grouped: 2 rows 5.25 / 7.97 ms, 4 rows 7.28 /
# 10.31, 8 rows 10.78 / 14.40, 16 rows 16.06 / 19.76, 32 rows 25.02 / 26.13; 32 rows fed 8 distinct tokens (each
# route taken by 4 rows) 22.46 / 17.33, fed 1 token 21.25 / 10.69 (H100, 2026-12-06,
# bench/results/decode_moe_overlap_h100.json). Grouped's step grows by ~0.18 ms per distinct expert a layer reads
# (48 layers x one 9.4 MB expert), so at 8 rows it wins only if fewer than ~31 distinct experts serve a layer's 64
# (row, expert) pairs (51 when routing is uniform); at 16 rows, fewer than ~61 of 128 (81 uniform). How alike a
# trained model's rows route was not measured: fused up to 8, where only a strong overlap would lose.
# Measured on 30B-A3B only; other MoE shapes and cards take the same default (a failed capture falls back).
EXPERTS_FUSED_MAX_ROWS = 8
EXPERTS = ("grouped", "gathered", "fused")
# How a decode step attends to the cache where qvl.infer.attend_kernels' split-key Triton kernel runs (CUDA):
# "split" (one kernel and a small merge) or "plain" (the scores' matmul, the softmax, the values' matmul). With
# chunks that give each multiprocessor a program (attend_kernels.chunk_for), split was the faster on both shapes
# measured: the 8B step at 1 row x 1,100 keys 6.77 ms against 6.91 plain, at 32 rows x 300 7.72 against 7.95;
# 30B-A3B's 4.24 against 4.38 and 23.85 against 23.93 (H100, 2026-12-06, bench/results/decode_8b_split_h100.json,
# decode_moe_split_h100.json). With a fixed 128-key chunk it had lost 19 % on 30B-A3B (36 programs at 1 row:
# bench/results/decode_moe_fused_down_h100.json). A step that fails to capture with it captures plainly
# (DecodeModel._capture); bench/decode.py times both (``attention_ms``, ``attention_split_programs_per_sm``).
ATTENTION = "split"
# How a 1-row step runs its projections (q/k/v, o, a dense MLP's, a MoE router where the experts run fused):
# "fused" (qvl.infer.gemv_kernels' Triton GEMV with the RMS norms folded into the projections that read them and the
# residual adds into those that feed them, q/k norms + RoPE + the cache write in qvl.infer.qk_kernels' one kernel;
# the fused experts fold their norm too), "gemv" (the GEMV alone, for q/k/v, o and the router), or "cublas" (F.linear
# and the compiled small kernels). Steps of more rows run cuBLAS either way. 1-row steps at 1,100 keys, same call:
# 30B-A3B 3.74 (fused) against 3.97 (gemv) and 4.17 ms (cublas), 260 tok/s decoded; 8B 6.09 against 6.41 and
# 6.57 ms, 162 tok/s, 80 % of its bound (H100, 2026-12-06, bench/results/decode_moe_fused_small_h100.json,
# decode_8b_fused_small_h100.json). bench/decode.py times the three ways (``projections_ms``) and keeps the fastest
# for its own rows.
PROJECTIONS = "fused"
PROJECTIONS_WAYS = ("cublas", "gemv", "fused")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the same operations in the same order as Qwen3VLTextRMSNorm, so results match it exactly
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on heads x (B, H, D) at each row's position: cos / sin (B, D)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


def qkv_in(x, ln, wqkv, eps: float, small: str = "cublas"):
    """Input norm and the fused q/k/v projection: x (B, hidden) -> (B, (Hq + 2 Hkv) * D). ``small``: the 1-row
    step's way (:data:`PROJECTIONS`): "gemv" projects through :func:`qvl.infer.gemv_kernels.gemv`, "fused" folds the
    norm into it too."""
    from qvl.infer.gemv_kernels import linear

    if small == "fused":
        return linear(x, wqkv, True, norm=ln, eps=eps)
    return linear(rms_norm(x, ln, eps), wqkv, small == "gemv")


def attn_in(x, ln, wqkv, qn, kn, cos, sin, n_q: int, n_kv: int, eps: float, small: str = "cublas"):
    """Input norm, fused q/k/v, per-head q/k norms, RoPE. x (B, hidden) -> q (B, Hq, D), k, v (B, Hkv, D).
    ``small``: as :func:`qkv_in`."""
    b, d = x.shape[0], qn.shape[0]
    q, k, v = qkv_in(x, ln, wqkv, eps, small).split((n_q * d, n_kv * d, n_kv * d), dim=-1)
    q = rotate(rms_norm(q.view(b, n_q, d), qn, eps), cos, sin)
    k = rotate(rms_norm(k.view(b, n_kv, d), kn, eps), cos, sin)
    return q, k, v.view(b, n_kv, d)


def attend(q, keys, values, mask, scale: float, split: bool = False):
    """One query per row over its cache: q (B, Hq, D), keys/values (B, Hkv, L, D), mask (B, L) -> (B, Hq*D).
    ``split``: as qvl.infer.attend_kernels' split-key Triton kernel computes it, where that runs."""
    if split:
        from qvl.infer import attend_kernels

        return attend_kernels.attend(q, keys, values, mask, scale)
    b, n_q, d = q.shape
    n_kv = keys.shape[1]
    qg = q.view(b, n_kv, n_q // n_kv, d)  # grouped-query: each kv head serves n_q / n_kv query heads
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, n_q * d)


def router_top_k(h, router, top_k: int):
    """The Hugging Face router: softmax (float32) over the experts, top-k, the k weights renormalised and cast
    back to the model dtype. h (B, hidden) -> weights (B, k), expert ids (B, k)."""
    logits = F.linear(h, router)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), experts


def experts_grouped(h, weights, experts, gate_up, down):
    """The routed experts as grouped GEMMs over the (row, expert) pairs sorted by expert (each selected expert's
    weights read once; fixed shapes, all experts as groups, empty ones skipped): the training path's
    :func:`qvl.models.moe_experts.experts_output` without adapters."""
    from qvl.models.moe_experts import experts_output

    return experts_output(h, experts, weights, gate_up, down, F.silu)


def experts_gathered(h, weights, experts, gate_up, down):
    """The routed experts per (row, expert) pair: the pair's expert weights indexed and multiplied-and-summed
    (float32 accumulation, as a matmul); under torch.compile one fused kernel that reads only those rows."""
    b, k = experts.shape
    flat = experts.reshape(-1)
    x = h.repeat_interleave(k, dim=0)
    gu = (gate_up[flat].float() * x[:, None, :].float()).sum(-1).to(h.dtype)
    gate, up = gu.chunk(2, dim=-1)
    act = F.silu(gate) * up
    y = (down[flat].float() * act[:, None, :].float()).sum(-1).to(h.dtype)
    return (y * weights.reshape(-1, 1)).view(b, k, -1).sum(dim=1)


def mlp_out(a, x, wo, ln, mlp: tuple, eps: float, top_k: int = 0, experts: str = "grouped", small: str = "cublas"):
    """o_proj + residual, post-attention norm, MLP + residual: SwiGLU over ``mlp = (wgu, wdown)``, or with
    ``top_k`` the routed experts over ``mlp = (router, gate_up, down)``, run as ``experts`` says (:data:`EXPERTS`).
    ``small``: the 1-row step's way (:data:`PROJECTIONS`): "gemv" runs o_proj and the router through
    :func:`qvl.infer.gemv_kernels.gemv`; "fused" those and a dense MLP's projections, with the residual adds and the
    norm folded into them (and into the fused experts)."""
    from qvl.infer.gemv_kernels import linear

    if small == "fused":
        x = linear(a, wo, True, residual=x)
        h, folded = x, {"norm": ln, "eps": eps}  # the kernels normalise x themselves
    else:
        x = x + linear(a, wo, small == "gemv")
        h, folded = rms_norm(x, ln, eps), {}
    if top_k:
        router, gate_up, down = mlp
        if experts == "fused":
            from qvl.infer import moe_kernels

            return moe_kernels.routed_experts(h, linear(h, router, small != "cublas", **folded), top_k, gate_up,
                                              down, **folded, residual=x)
        h = rms_norm(x, ln, eps) if folded else h
        weights, ids = router_top_k(h, router, top_k)
        run = experts_gathered if experts == "gathered" else experts_grouped
        return x + run(h, weights, ids, gate_up, down)
    wgu, wdown = mlp
    gate, up = linear(h, wgu, bool(folded), **folded).chunk(2, dim=-1)
    if folded:
        return linear(F.silu(gate) * up, wdown, True, residual=x)
    return x + F.linear(F.silu(gate) * up, wdown)


def layer_step(x, ln1, wqkv, qn, kn, wo, ln2, mlp: tuple, k_cache, v_cache, rows, pos, mask, cos, sin, n_q: int,
               n_kv: int, eps: float, scale: float, top_k: int = 0, experts: str = "grouped",
               split_attention: bool = False, small: str = "cublas"):
    """A whole decoder layer for one new token per row, the cache write included (one compiled graph). Row i is
    slot i (``rows`` is ``arange``, as :meth:`DecodeModel._step` passes it). ``small``: the 1-row step's way
    (:data:`PROJECTIONS`); "fused" also normalises, rotates and writes q/k/v in
    :func:`qvl.infer.qk_kernels.qk_rope_write`, which writes row i's key and value into slot i."""
    if small == "fused":
        from qvl.infer.qk_kernels import qk_rope_write

        q = qk_rope_write(qkv_in(x, ln1, wqkv, eps, small), qn, kn, cos, sin, k_cache, v_cache, pos, n_q, eps)
    else:
        q, k, v = attn_in(x, ln1, wqkv, qn, kn, cos, sin, n_q, n_kv, eps, small)
        k_cache[rows, :, pos] = k
        v_cache[rows, :, pos] = v
    b, n_keys = mask.shape
    a = attend(q, k_cache[:b, :, :n_keys], v_cache[:b, :, :n_keys], mask, scale, split_attention)
    return mlp_out(a, x, wo, ln2, mlp, eps, top_k, experts, small)


def packed_layer(x, ln1, wqkv, qn, kn, wo, ln2, mlp: tuple, k_cache, v_cache, slot_of, index_of, cos, sin, cu,
                 longest: int, key_cu, slot: int, keys: int, n_q: int, n_kv: int, eps: float, scale: float,
                 top_k: int = 0):
    """A whole decoder layer over a packed row's new tokens x (T, hidden) on the flash varlen kernel, the cache
    writes included (one compiled graph, as :func:`layer_step` is for a decode step): token t's key / value written
    at slot ``slot_of[t]``, cache index ``index_of[t]`` of the caches (slots, Hkv, L, D). ``key_cu`` None: the row
    holds whole prompts, each attending to itself (query segments ``cu``, the longest ``longest``). Else the tokens
    are slot ``slot``'s, on top of its first entries, and the key segment ``key_cu`` ([0, keys]) reads its first
    ``keys`` entries from the cache as they lie (flash aligns causal to the segment's end).

    Why one graph: run as pieces (two compiled functions, eager cache writes and attention), a 283-token follow-up
    turn spent 23.6 ms for 12.9 ms of kernels, its host launching 36 layers x 2 compiled calls, their guards, the
    writes and the attention's wrapper (H100, 2026-12-07, bench/results/decode_followup_ab_h100.json). One graph a
    layer, the keys' grouped heads going to flash as they are (qvl.data.packing._grouped_heads), was faster in
    every row on an H100 (2026-12-07, bench/results/decode_grouped_h100.json): a follow-up 16.2 against 20.8 ms,
    a 1,024-token prompt 60.4 against 61.2, a 448x448-image prompt 34.7 against 40.1, eight of them 89.8 against
    90.1 (on a slower host, before the grouped heads: 23.1 against 50.8 ms, decode_whole_keys_h100.json).
    """
    from qvl.data.packing import varlen_causal

    q, k, v = attn_in(x, ln1, wqkv, qn, kn, cos, sin, n_q, n_kv, eps)
    k_cache[slot_of, :, index_of] = k
    v_cache[slot_of, :, index_of] = v
    heads = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, T, D) views
    if key_cu is None:
        a = varlen_causal(*heads, cu, longest, scale)
    else:
        a = varlen_causal(heads[0], k_cache[slot, :, :keys][None], v_cache[slot, :, :keys][None], cu, longest,
                          scale, key_cu=key_cu, key_max=keys)
    return mlp_out(a[0].reshape(x.shape[0], -1), x, wo, ln2, mlp, eps, top_k, "grouped")


def sizes_apart():
    """Around calls of the compiled :func:`packed_layer`: a call that traces takes each input size as its own
    symbol. By default dynamo takes sizes equal when traced equal ("duck sizing") and guards on it: a packed layer
    takes tokens, prompts + 1 bounds, slots, heads and the cache length, and a row whose values differed where
    warm()'s met (3 prompts + 1 bounds in 4 slots, 8 new tokens and 8 key / value heads) compiled again (CPU,
    tests/infer/test_packed_prefill.py). Once per prefill, not per layer: the switch costs ~10-30 us."""
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)


def final_logits(x, norm, head, eps: float):
    return F.linear(rms_norm(x, norm, eps), head).float()


def _fuse(modules: list[torch.nn.Linear]) -> torch.Tensor:
    """One weight tensor for several Linear layers; their weights become views of it (no extra memory)."""
    fused = torch.cat([m.weight.data for m in modules], dim=0)
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = fused[start:start + n]
        start += n
    return fused


class PromptTooLong(ValueError):
    """A prompt longer than the slot cache: the request's own fault, whichever way it is prefilled."""


def _buckets(limit: int, first: int) -> list[int]:
    out, b = [], first
    while b < limit:
        out.append(b)
        b *= 2
    return out + [limit]


def bucket(value: int, buckets: list[int]) -> int:
    for b in buckets:
        if value <= b:
            return b
    raise ValueError(f"{value} exceeds the largest bucket {buckets[-1]}")


class DecodeModel:
    """Prefill into slots and batched one-token decode steps for a Qwen3-VL model (dense or MoE)."""

    def __init__(self, model, slots: int, max_len: int, compile: bool | None = None,
                 cuda_graphs: bool | None = None):
        why = supports(model)
        if why:
            raise ValueError(why)
        self.model = model
        base, text, head = _parts(model)
        self.base, self.text = base, text
        cfg = text.config
        p = next(text.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.n_q, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.slots, self.max_len = slots, max_len
        self.layers = [LayerWeights.of(layer) for layer in text.layers]
        self.is_moe = any(w.top_k for w in self.layers)
        self.embed = text.embed_tokens.weight
        self.norm = text.norm.weight.data
        self.head = head.weight.data
        rot = text.rotary_emb
        self.inv_freq = rot.inv_freq.to(self.device, torch.float32)
        self.rope_scale = float(getattr(rot, "attention_scaling", 1.0))
        shape = (slots, self.n_kv, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        self.v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        # per-slot state, on the device: the next cache index to write, and the RoPE offset
        self.length = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.rope_delta = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.host_length = [0] * slots  # the same lengths on the host: bucket choice without a device sync
        self.busy: set[int] = set()
        self.batch_buckets = _buckets(slots, 1)
        self.len_buckets = _buckets(max_len, min(128, max_len))
        on_gpu = self.device.type == "cuda"
        self.use_graphs = on_gpu if cuda_graphs is None else (cuda_graphs and on_gpu)
        self.compiled = on_gpu if compile is None else compile
        # "layer": one compiled function per layer, the cache writes inside; "pieces": three compiled functions per
        # layer, the cache writes eager. Same tokens (tests); "layer" took 6.97 ms a batch-1 step against 7.41 and
        # 8.11 against 8.21 ms at 32 rows (H100, two calls, 2026-12-05, bench/results/decode_h100.json). The same
        # for MoE (30B-A3B, H100, 2026-12-06, bench/results/decode_moe_fused_h100.json): 4.89 against 5.13 ms a
        # batch-1 step with fused experts, 26.0 against 26.3 at 32 rows grouped
        self.impl = "layer"
        # MoE experts: "auto" (fused up to fused_max_rows rows where the kernels run, else gathered up to
        # gather_max_rows rows, grouped above), or one of EXPERTS for every batch
        self.experts = "auto"
        self.gather_max_rows = EXPERTS_GATHER_MAX_ROWS
        self.fused_max_rows = EXPERTS_FUSED_MAX_ROWS
        # inductor compiles torch._grouped_mm for bf16 weights only: others are gathered when compiled
        self._grouped_ok = not self.compiled or self.dtype == torch.bfloat16
        from qvl.infer import moe_kernels

        self._fused_ok = self.is_moe and moe_kernels.available(self.device)
        # attention over the cache: "split" (qvl.infer.attend_kernels' Triton kernel, where it runs) or "plain"
        self.attention = ATTENTION
        from qvl.infer import attend_kernels

        self._split_ok = attend_kernels.takes(self.device, self.head_dim, self.dtype)
        # the projections of a 1-row step (PROJECTIONS): qvl.infer.gemv_kernels' kernel, where it runs
        from qvl.infer import gemv_kernels

        self.projections = PROJECTIONS
        self._gemv_ok = gemv_kernels.available(self.device)
        self._fold_ok = True  # "fused"'s kernels (folded norms and adds, qk_kernels): off after a failed capture
        self._fns = {f.__name__: (torch.compile(f, dynamic=True) if self.compiled else f)
                     for f in (attn_in, attend, mlp_out, layer_step, packed_layer, final_logits)}
        # how a prompt batch is prefilled: "packed" (qvl.infer.packed_prefill: one unpadded row, the decode step's
        # pieces, keys/values written straight into the slots) where it can run, else "padded" (:meth:`prefill`)
        from qvl.infer.packed_prefill import why_not

        self.prefill_why_padded = why_not(self)
        self.prefill_impl = "padded" if self.prefill_why_padded else "packed"
        # the packed prefill's layers where the flash varlen kernel runs: "whole" (:func:`packed_layer`, one compiled
        # graph a layer; faster in every dense row measured, see there), "pieces" (attn_in and mlp_out compiled, the
        # cache writes and the attention eager between them: what runs off the flash kernel, on CPU or in fp32), or
        # "whole-if-single": whole for a row of one prompt (a chat's turn, a follow-up), pieces for several. MoE
        # models take that: 30B-A3B on an H200 (2026-12-07, bench/results/decode_moe_prefill_h200.json), whole
        # against pieces, one 1,024x1,024-image prompt 105.3 against 123.8 ms, one 448x448 68.6 against 78.7, but
        # eight 448x448 126.4 against 113.4
        self.prefill_layers = "whole-if-single" if self.is_moe else "whole"
        self.prefill_ran_whole = False  # the last packed prefill's layers ran whole (which way a failure steps down)
        # static inputs of the captured graphs (the first B entries are a batch of B rows)
        self._tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._pool = None

    # ------------------------------------------------------------------ sizes
    @staticmethod
    def cache_bytes_per_token(model) -> int:
        _, text, _ = _parts(model)
        cfg = text.config
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elt = next(text.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * d * elt

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, slots: list[int], batch: dict, positions: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Run a right-padded prompt batch (``positions`` (4, B, L)) and fill ``slots``; -> last logits (B, V).

        Right padding puts every prompt at cache index 0, so each layer's keys/values go to their slots in
        one copy; the padding copied past a prompt's end is masked out and overwritten by decoding.
        """
        width = batch["input_ids"].shape[1]
        if max(lengths) > self.max_len:
            raise PromptTooLong(f"prompt of {max(lengths)} tokens exceeds the cache length {self.max_len}")
        out = self.base.model(**batch, position_ids=positions, use_cache=True)
        # transformers >= 5.24 names it `cache` (reading `past_key_values` there prints a deprecation); 5.17 has only
        # `past_key_values`
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = getattr(out, "past_key_values", None)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        hidden = out.last_hidden_state[torch.arange(len(lengths), device=self.device), last]
        index = torch.tensor(slots, device=self.device)
        for layer, (k, v) in enumerate(_cache_layers(cache)):
            self.k[layer][index, :, :width] = k
            self.v[layer][index, :, :width] = v
        for i, (slot, n) in enumerate(zip(slots, lengths)):
            self.host_length[slot] = n
            self.busy.add(slot)
        self.length[index] = torch.tensor(lengths, device=self.device)
        delta = positions[1:].amax(dim=(0, 2)) + 1 - torch.tensor(lengths, device=positions.device)
        self.rope_delta[index] = delta.to(self.device)
        return F.linear(hidden, self.head).float()

    # ------------------------------------------------------------------ decode
    def _step(self, n_rows: int, n_keys: int) -> torch.Tensor:
        """One token for rows 0..n_rows-1 (tokens in self._tokens); attention reads cache entries < n_keys."""
        rows = torch.arange(n_rows, device=self.device)
        pos = self.length[:n_rows]
        rope = (pos + self.rope_delta[:n_rows]).float()
        freqs = rope[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(self.dtype)
        sin = (emb.sin() * self.rope_scale).to(self.dtype)
        mask = torch.arange(n_keys, device=self.device)[None, :] <= pos[:, None]
        x = F.embedding(self._tokens[:n_rows], self.embed)
        f = self._fns
        experts = self._experts_for(n_rows)
        split = self._split_attention()
        small = self._projections_for(n_rows)
        for i, w in enumerate(self.layers):
            if self.impl == "layer":
                x = f["layer_step"](x, w.ln1, w.wqkv, w.qn, w.kn, w.wo, w.ln2, w.mlp, self.k[i], self.v[i],
                                    rows, pos, mask, cos, sin, self.n_q, self.n_kv, self.eps, self.scale, w.top_k,
                                    experts, split, small)
                continue
            q, k, v = f["attn_in"](x, w.ln1, w.wqkv, w.qn, w.kn, cos, sin, self.n_q, self.n_kv, self.eps, small)
            self.k[i][rows, :, pos] = k
            self.v[i][rows, :, pos] = v
            a = f["attend"](q, self.k[i][:n_rows, :, :n_keys], self.v[i][:n_rows, :, :n_keys], mask, self.scale,
                            split)
            x = f["mlp_out"](a, x, w.wo, w.ln2, w.mlp, self.eps, w.top_k, experts, small)
        self.length[:n_rows] += 1
        return f["final_logits"](x, self.norm, self.head, self.eps)

    def _experts_for(self, n_rows: int) -> str:
        """How a MoE step of ``n_rows`` rows runs its experts (:data:`EXPERTS`): as asked, or by the row limits
        ("auto"); fused only where its kernels run and grouped only where the grouped GEMM does (else gathered)."""
        if not self.is_moe:
            return "grouped"  # unused: a dense MLP
        fused = self._fused_ok and (self.experts == "fused" or (self.experts == "auto"
                                                                 and n_rows <= self.fused_max_rows))
        if fused:
            return "fused"
        grouped = self._grouped_ok and (self.experts == "grouped" or (self.experts in ("auto", "fused")
                                                                     and n_rows > self.gather_max_rows))
        return "grouped" if grouped else "gathered"

    def _split_attention(self) -> bool:
        return self.attention == "split" and self._split_ok

    def _projections_for(self, n_rows: int) -> str:
        """How a step of ``n_rows`` rows runs its projections (:data:`PROJECTIONS`): as asked where the kernels run
        and the step is small enough for them, else "cublas"."""
        from qvl.infer.gemv_kernels import MAX_ROWS

        way = self.projections if self._gemv_ok and n_rows <= MAX_ROWS else "cublas"
        return "gemv" if way == "fused" and not self._fold_ok else way

    @property
    def _overlap_ok(self) -> bool:
        """Whether the step's Triton kernels overlap their launches: qvl.infer.triton_support.LAUNCH_OVERLAP, one
        switch for the process (the kernels read it as they launch), turned off here by a failed capture."""
        return triton_support.LAUNCH_OVERLAP

    @_overlap_ok.setter
    def _overlap_ok(self, on: bool) -> None:
        triton_support.LAUNCH_OVERLAP = on

    def _grouped_for(self, n_rows: int) -> bool:
        """Whether a MoE step of ``n_rows`` rows runs its experts as grouped GEMMs."""
        return self._experts_for(n_rows) == "grouped"

    def set_impl(self, impl: str, experts: str | None = None, attention: str | None = None,
                 projections: str | None = None) -> None:
        """Switch the step's implementation (benchmarks compare them), for MoE how the routed experts run
        ("auto" or one of :data:`EXPERTS`), how attention runs ("split" or "plain") and the projections
        (:data:`PROJECTIONS`); captured graphs are dropped."""
        if impl not in ("layer", "pieces"):
            raise ValueError(f"unknown decode step implementation {impl!r}")
        if experts is not None and experts not in ("auto", *EXPERTS):
            raise ValueError(f"unknown experts implementation {experts!r}")
        if attention is not None and attention not in ("split", "plain"):
            raise ValueError(f"unknown attention implementation {attention!r}")
        if projections is not None and projections not in PROJECTIONS_WAYS:
            raise ValueError(f"unknown projections implementation {projections!r}")
        self.impl = impl
        self.experts = experts or self.experts
        self.attention = attention or self.attention
        self.projections = projections or self.projections
        self._graphs.clear()
        self._pool = None  # a pool whose graphs are all gone cannot take new captures

    def set_tokens(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """The tokens the next decode step feeds for ``slots`` (device tensors: no host round trip)."""
        self._tokens.index_copy_(0, slots, tokens)

    @torch.inference_mode()
    def decode(self, n_rows: int) -> torch.Tensor:
        """One step for slots 0..n_rows-1, feeding the tokens set by :meth:`set_tokens`, each at its slot's
        current length; -> logits (bucket rows, V) float32 (rows past n_rows are not requests).

        Every slot of the bucket advances by one (free slots too: their values are never read).
        """
        longest = max((self.host_length[s] for s in self.busy if s < n_rows), default=0) + 1
        if longest > self.max_len:
            raise ValueError(f"a row would exceed the cache length {self.max_len}")
        b = bucket(n_rows, self.batch_buckets)
        lb = bucket(longest, self.len_buckets)
        # rows that hold no request advance too: keep their write position inside the cache
        self.length[:b].clamp_(max=self.max_len - 1)
        for s in self.busy:
            if s < n_rows:
                self.host_length[s] += 1
        if not self.use_graphs:
            return self._step(b, lb)
        graph = self._graphs.get((b, lb)) or self._capture(b, lb)
        graph[0].replay()
        return graph[1]

    def _capture(self, b: int, lb: int):
        """Capture the step for (b rows, lb keys); warm-up runs first (they compile), state is restored. Should
        a step fail to compile or capture (not for want of memory) where the same step without overlapped launches,
        without the folds or the projections' GEMV kernel, or with plain attention, captures, that is off for the
        captures from then on (the graphs made stay: they captured). Else, with fused (Triton) or grouped-GEMM
        experts, no batch runs them that way from then on (fused ones go grouped, grouped ones gathered): the graphs
        that ran them go, the others stay."""
        try:
            return self._capture_once(b, lb)
        except torch.OutOfMemoryError:
            raise  # not the experts kernels' fault: the request fails, the experts keep their way
        except Exception as e:  # noqa: BLE001 -- any compile / capture failure of the fused or grouped path
            overlapped = triton_support.overlap(self.device)["PDL"] and (  # the step launches a Triton kernel
                self._projections_for(b) != "cublas" or self._split_attention() or self._experts_for(b) == "fused")
            for flag, used, instead in (("_overlap_ok", overlapped, "launch the kernels one after another"),
                                        ("_fold_ok", self._projections_for(b) == "fused", "project through the GEMV "
                                                                                          "alone"),
                                        ("_gemv_ok", self._projections_for(b) != "cublas", "project through cuBLAS"),
                                        ("_split_ok", self._split_attention(), "attend plainly")):
                if not used:
                    continue
                setattr(self, flag, False)  # the same step without that kernel: if it captures, the kernel failed
                try:
                    graph = self._capture_once(b, lb)
                except torch.OutOfMemoryError:
                    raise
                except Exception:  # noqa: BLE001 -- it failed without the kernel too: not the kernel's fault
                    setattr(self, flag, True)
                else:
                    log.warning("a decode step with %s failed to compile or capture (%s: %s); steps captured from "
                                "now on %s", {"_overlap_ok": "overlapped kernel launches (programmatic "
                                                             "dependent launch)",
                                              "_fold_ok": "the norms, adds and q/k RoPE folded into kernels",
                                              "_gemv_ok": "the projections' GEMV kernel",
                                              "_split_ok": "split-key attention"}[flag],
                                type(e).__name__, str(e)[:200], instead)
                    return graph
            kind = self._experts_for(b)
            if kind not in ("fused", "grouped"):
                raise
            names = {"fused": "fused (Triton)", "grouped": "grouped-GEMM"}
            log.warning("%s experts failed to compile or capture (%s: %s); %s them instead", names[kind],
                        type(e).__name__, str(e)[:200], "grouping" if kind == "fused" else "gathering")
            dropped = [key for key in self._graphs if self._experts_for(key[0]) == kind]
            if kind == "fused":
                self._fused_ok = False
            else:
                self._grouped_ok = False
                from qvl.infer.packed_prefill import why_not

                if why_not(self):  # the packed prefill would run them grouped too
                    self.prefill_impl, self.prefill_why_padded = "padded", why_not(self)
            for key in dropped:
                del self._graphs[key]
            if not self._graphs:
                self._pool = None  # a pool whose graphs are all gone cannot take new captures
            return self._capture(b, lb)

    def _capture_once(self, b: int, lb: int):
        saved = self.length.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step(b, lb)
                    self.length.copy_(saved)
            torch.cuda.current_stream().wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._step(b, lb)
        finally:
            self.length.copy_(saved)  # capturing does not run the step (nor does a failed warm-up)
        self._graphs[(b, lb)] = (graph, logits)
        log.info("captured the decode step for %d rows x %d keys", b, lb)
        return self._graphs[(b, lb)]

    def warmup(self, max_rows: int | None = None, max_keys: int | None = None) -> None:
        """Capture every (batch, length) bucket now, so no request waits for a capture or a compile."""
        if not self.use_graphs:
            return
        with torch.inference_mode():
            for b in self.batch_buckets:
                if max_rows and b > bucket(max_rows, self.batch_buckets):
                    break
                for lb in self.len_buckets:
                    if max_keys and lb > bucket(max_keys, self.len_buckets):
                        break
                    if (b, lb) not in self._graphs:
                        self._capture(b, lb)

    def release(self, slot: int) -> None:
        self.length[slot] = 0
        self.rope_delta[slot] = 0
        self.host_length[slot] = 0
        self.busy.discard(slot)


def _cache_layers(cache):
    """(keys, values) per layer of a transformers cache object, across transformers 5.x versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return list(zip(cache.key_cache, cache.value_cache))
