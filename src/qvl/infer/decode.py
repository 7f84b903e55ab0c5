"""The fast decode path of the transformers backend: a slot KV cache and a captured decode step.

``model.generate`` re-runs Python over every module for every token and grows its cache by
concatenation; at batch 1 on an H100 that is ~6 % of what the memory bandwidth allows. Here:

* **Prefill** runs the Hugging Face forward once per request batch (vision encoder, DeepStack,
  mRoPE positions from ``qvl.data.packing.sample_positions``), keeps only the last position's
  logits, and copies each request's keys/values into its **slot** of a pre-allocated cache.
* **Decode** is our own step over the same weights: RMSNorm, fused q/k/v and gate/up matrices
  (the modules' weights become views of the fused tensors, so no memory is added), q/k norms,
  RoPE, the new key/value written at each row's own position, attention over the first ``Lb``
  cache entries with a per-row length mask, the MLP, the final norm and ``lm_head``. New tokens
  are text, whose three mRoPE components are equal, so the rotation is the plain 1-D one at
  ``position + rope_delta`` (rope_delta = the request's largest prompt position + 1 - its length).
* On CUDA the per-layer pieces are compiled by ``torch.compile`` (dynamic shapes: one compile for
  every batch and length) and the whole step is captured in a CUDA graph for each (batch bucket,
  length bucket) pair, so a decode step is one graph launch. On CPU it runs eagerly (tests).

Rows are cache slots: a batch of ``B`` rows reads slots ``0..B-1``; free slots inside that range
compute garbage that nobody reads. Only dense Qwen3-VL language models without biases qualify
(:func:`supports`); anything else (MoE, unmerged adapters) uses ``model.generate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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
    layer = text.layers[0]
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return "mixture-of-experts layers use model.generate"
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        if type(getattr(layer.self_attn, name)) is not torch.nn.Linear:
            return "adapter-wrapped projections use model.generate (merge the adapter first)"
    if getattr(cfg, "rope_parameters", {}).get("rope_type", "default") != "default":
        return "scaled RoPE variants use model.generate"
    return None


@dataclass
class LayerWeights:
    ln1: torch.Tensor
    wqkv: torch.Tensor
    qn: torch.Tensor
    kn: torch.Tensor
    wo: torch.Tensor
    ln2: torch.Tensor
    wgu: torch.Tensor
    wdown: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the same operations in the same order as Qwen3VLTextRMSNorm, so results match it exactly
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attn_in(x, ln, wqkv, qn, kn, cos, sin, n_q: int, n_kv: int, eps: float):
    """Input norm, fused q/k/v, per-head q/k norms, RoPE. x (B, hidden) -> q (B, Hq, D), k, v (B, Hkv, D)."""
    b = x.shape[0]
    h = rms_norm(x, ln, eps)
    qkv = F.linear(h, wqkv)
    d = qn.shape[0]
    q, k, v = qkv.split((n_q * d, n_kv * d, n_kv * d), dim=-1)
    q = rms_norm(q.view(b, n_q, d), qn, eps)
    k = rms_norm(k.view(b, n_kv, d), kn, eps)
    cos, sin = cos[:, None, :], sin[:, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    return q, k, v.view(b, n_kv, d)


def attend(q, keys, values, mask, scale: float):
    """One query per row over its cache: q (B, Hq, D), keys/values (B, Hkv, L, D), mask (B, L) -> (B, Hq*D)."""
    b, n_q, d = q.shape
    n_kv = keys.shape[1]
    qg = q.view(b, n_kv, n_q // n_kv, d)  # grouped-query: each kv head serves n_q / n_kv query heads
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(values.dtype)
    return torch.matmul(probs, values).reshape(b, n_q * d)


def mlp_out(a, x, wo, ln, wgu, wdown, eps: float):
    """o_proj + residual, post-attention norm, SwiGLU MLP + residual."""
    x = x + F.linear(a, wo)
    h = rms_norm(x, ln, eps)
    gate, up = F.linear(h, wgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wdown)


def layer_step(x, ln1, wqkv, qn, kn, wo, ln2, wgu, wdown, k_cache, v_cache, rows, pos, mask, cos, sin, n_q: int,
               n_kv: int, eps: float, scale: float):
    """A whole decoder layer for one new token per row, the cache write included (one compiled graph)."""
    q, k, v = attn_in(x, ln1, wqkv, qn, kn, cos, sin, n_q, n_kv, eps)
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    b, n_keys = mask.shape
    a = attend(q, k_cache[:b, :, :n_keys], v_cache[:b, :, :n_keys], mask, scale)
    return mlp_out(a, x, wo, ln2, wgu, wdown, eps)


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
    """Prefill into slots and batched one-token decode steps for a dense Qwen3-VL model."""

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
        self.layers = []
        for layer in text.layers:
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(LayerWeights(
                layer.input_layernorm.weight.data, _fuse([at.q_proj, at.k_proj, at.v_proj]), at.q_norm.weight.data,
                at.k_norm.weight.data, at.o_proj.weight.data, layer.post_attention_layernorm.weight.data,
                _fuse([mlp.gate_proj, mlp.up_proj]), mlp.down_proj.weight.data))
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
        # "pieces": three compiled functions per layer, cache writes eager (measured: bench/results/decode.json);
        # "layer": one compiled function per layer, cache writes inside (same tokens; speed not yet measured)
        self.impl = "pieces"
        self._fns = {f.__name__: (torch.compile(f, dynamic=True) if self.compiled else f)
                     for f in (attn_in, attend, mlp_out, layer_step, final_logits)}
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
            raise ValueError(f"prompt of {max(lengths)} tokens exceeds the cache length {self.max_len}")
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
        for i, w in enumerate(self.layers):
            if self.impl == "layer":
                x = f["layer_step"](x, w.ln1, w.wqkv, w.qn, w.kn, w.wo, w.ln2, w.wgu, w.wdown, self.k[i], self.v[i],
                                    rows, pos, mask, cos, sin, self.n_q, self.n_kv, self.eps, self.scale)
                continue
            q, k, v = f["attn_in"](x, w.ln1, w.wqkv, w.qn, w.kn, cos, sin, self.n_q, self.n_kv, self.eps)
            self.k[i][rows, :, pos] = k
            self.v[i][rows, :, pos] = v
            a = f["attend"](q, self.k[i][:n_rows, :, :n_keys], self.v[i][:n_rows, :, :n_keys], mask, self.scale)
            x = f["mlp_out"](a, x, w.wo, w.ln2, w.wgu, w.wdown, self.eps)
        self.length[:n_rows] += 1
        return f["final_logits"](x, self.norm, self.head, self.eps)

    def set_impl(self, impl: str) -> None:
        """Switch the step's implementation (benchmarks compare them); captured graphs are dropped."""
        if impl not in ("layer", "pieces"):
            raise ValueError(f"unknown decode step implementation {impl!r}")
        self.impl = impl
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
        """Capture the step for (b rows, lb keys); warm-up runs first (they compile), state is restored."""
        saved = self.length.clone()
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
        self.length.copy_(saved)  # capturing does not run the step
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
