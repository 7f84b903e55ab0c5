"""Prefill as one packed row: a prefill batch's prompts laid end to end without padding, each attending only to
itself, every layer's keys/values written straight into the prompts' cache slots.

Why: :meth:`qvl.infer.decode.DecodeModel.prefill` runs transformers' forward over a right-padded batch. That
forward reads the device several times (the tower's grid-derived values, per-image splits, placeholder
checks), computes every row to the longest prompt, fills a temporary cache and then copies it into the slots. On an
H200 one request with a 448x448 image (~300 tokens) took 62 ms from admission to its first token
(``bench/results/serve.json``, 2026-12-05, ``server_stages.clients_1``), for a few ms of GEMMs.

Here the host lays the row out (sample bounds, each token's slot and cache index, the tower's grid-derived inputs:
:func:`qvl.train.row_forward.vision_extras`). Embedding, tower and feature placement are the training path's
(:func:`qvl.train.row_forward.row_inputs`, with the vision cache in front of the tower). Each decoder layer is the
decode step's own pieces (:func:`qvl.infer.decode.attn_in` and :func:`~qvl.infer.decode.mlp_out`, compiled on a
GPU) around one causal varlen attention call over the row. ``tests/infer/test_packed_prefill.py`` checks the
logits and the slots' keys/values against :meth:`DecodeModel.prefill`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qvl.train.row_forward import MEDIA

log = logging.getLogger("qvl.infer")


def why_not(d) -> str | None:
    """None when :func:`prefill` can run for decoder ``d`` (a :class:`qvl.infer.decode.DecodeModel`), else why not."""
    from qvl.train.row_forward import usable

    if not usable(d.base.model, d.base.config):
        return "not a Qwen3-VL model whose tower takes precomputed inputs"
    if d.is_moe and not d._grouped_ok:
        return "its experts would run gathered (compiled, not bf16), which reads a copy of an expert per token"
    return None


def fall_back(d, error: Exception) -> None:
    """The packed prefill failed other than for memory or a too-long prompt: one step down from now on, said once,
    the request prefilled again that way. Whole compiled layers step down to the compiled pieces (the part that
    runs nowhere else: a compiler or kernel failure there need not cost the packed prefill); pieces to padded."""
    if whole_layers(d) and d.prefill_ran_whole:
        d.prefill_layers = "pieces"
        log.warning("the packed prefill's whole compiled layers failed (%s: %s); its layers run as compiled pieces "
                    "from now on", type(error).__name__, str(error)[:200], exc_info=error)
        return
    d.prefill_impl = "padded"
    d.prefill_why_padded = f"the packed prefill failed: {type(error).__name__}: {str(error)[:200]}"
    log.warning("%s; prompts are prefilled as padded batches through transformers' forward from now on",
                d.prefill_why_padded, exc_info=error)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, bounds: list, longest: int,
           scale: float) -> torch.Tensor:
    """Causal attention inside each prompt of the row: q (T, Hq, D), k / v (T, Hkv, D) -> (T, Hq * D). One flash
    varlen call on a GPU, causal sdpa per prompt elsewhere."""
    from qvl.data.packing import varlen_causal, varlen_usable

    as_heads = [t.transpose(0, 1)[None] for t in (q, k, v)]  # (1, H, T, D) views
    if varlen_usable(q, 0.0):
        out = varlen_causal(*as_heads, cu, longest, scale)[0]
    else:
        qh, kh, vh = as_heads[0], *(_all_heads(t, q.shape[1]) for t in as_heads[1:])
        out = torch.cat([F.scaled_dot_product_attention(qh[:, :, s:e], kh[:, :, s:e], vh[:, :, s:e], is_causal=True,
                                                         scale=scale) for s, e in bounds], dim=2)
        out = out[0].transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def _all_heads(t: torch.Tensor, n_q: int) -> torch.Tensor:
    """(1, Hkv, L, D) -> (1, Hq, L, D), each key / value head repeated for its query heads (as transformers'
    repeat_kv). sdpa's own grouped-query support (``enable_gqa``) is flash's and the math kernel's only in torch 2.11
    (its docstring; memory-efficient attention has it in 2.14): with a mask, or where flash cannot run, that is the
    math kernel, which holds the whole score matrix (32 heads x 16k x 16k floats: 34 GB)."""
    return t if t.shape[1] == n_q else t.repeat_interleave(n_q // t.shape[1], dim=1)


def _encoder(visual, vision_config, cache, keys: dict, host_grids: dict, device):
    """``encode`` for :func:`row_inputs`: the tower's output through ``cache`` (a VisionCache) where the items have
    content keys: kept items are not encoded again, the others are encoded on their own."""
    from qvl.train.row_forward import run_tower, vision_extras

    kinds = {kind: pixel_key for kind, pixel_key, _ in MEDIA}

    def encode(kind, pixels, grid, kw):
        pixel_key = kinds[kind]
        items, host = keys.get(pixel_key), host_grids[pixel_key]
        if cache is None or not cache.enabled or not items or len(items) != len(host):
            return run_tower(visual, pixels, grid, kw)
        rows = host.prod(-1).tolist()

        def encode_items(missing: list[int]):
            if len(missing) == len(items):
                return run_tower(visual, pixels, grid, kw)
            starts = [sum(rows[:i]) for i in range(len(rows))]
            sub = host[missing]
            extras = {k: v.to(device) if torch.is_tensor(v) else v
                      for k, v in vision_extras(sub, vision_config).items()}
            return run_tower(visual, torch.cat([pixels[starts[i]:starts[i] + rows[i]] for i in missing]),
                             sub.to(device), extras)

        out = cache.lookup(items, rows, encode_items)
        return out if out is not None else run_tower(visual, pixels, grid, kw)

    return encode


@dataclass
class Span:
    """Where a packed row's new tokens go and what they attend to: token t's slot ``slot_of[t]`` and cache index
    ``index_of[t]`` (device), the query segments ``cu`` (device) and the longest. ``slot`` None: the row holds whole
    prompts, each attending to itself (``bounds``: their (start, end) on the host). Else the tokens are that slot's,
    at cache indices ``index`` (host, consecutive), on top of its entries before them: the key segment ``key_cu``
    ([0, keys], device) is the slot's first entries (:func:`slot_span`)."""

    slot_of: torch.Tensor
    index_of: torch.Tensor
    cu: torch.Tensor
    longest: int
    bounds: list | None = None
    slot: int | None = None
    index: torch.Tensor | None = None
    key_cu: torch.Tensor | None = None
    keys: int = 0  # the key segment's length (the slot's entries up to the last new token's)


def slot_span(d, slot: int, start: int, end: int) -> Span:
    """Tokens ``start:end`` of ``slot``'s prompt, on top of its first ``start`` entries (none: they attend to
    themselves alone)."""
    index = torch.arange(start, end)
    slot_of, index_of, cu, key_cu = _on_device(d, torch.full((end - start,), slot), index,
                                               torch.tensor([0, end - start], dtype=torch.int32),
                                               torch.tensor([0, end], dtype=torch.int32))
    if start == 0:
        return Span(slot_of, index_of, cu, end, bounds=[(0, end)])
    return Span(slot_of, index_of, cu, end - start, slot=slot, index=index, key_cu=key_cu, keys=end)


def _layers(d, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, span: Span, deepstack=()) -> torch.Tensor:
    """The decoder layers over the tokens ``x`` (T, H), their keys / values written and attended as ``span`` says;
    the DeepStack features (1, T, H) added after the first layers. Where the flash varlen kernel runs, each layer is
    one compiled graph (:func:`qvl.infer.decode.packed_layer`; ``d.prefill_layers``), else pieces."""
    from qvl.infer.decode import sizes_apart

    whole = d.prefill_ran_whole = whole_layers(d, len(span.bounds) if span.slot is None else 1)
    attention = None if whole else _attention(d, span)
    with sizes_apart() if whole and d.compiled else contextlib.nullcontext():
        return _each_layer(d, x, cos, sin, span, deepstack, whole, attention)


def whole_layers(d, prompts: int = 1) -> bool:
    """Decoder ``d``'s packed prefill of a row of ``prompts`` prompts (a follow-up: 1) runs each layer as one
    compiled graph: asked (``d.prefill_layers`` "whole", or "whole-if-single" and one prompt) and on the flash varlen
    kernel (the graph is built around it)."""
    from qvl.data.packing import varlen_usable

    asked = d.prefill_layers == "whole" or (d.prefill_layers == "whole-if-single" and prompts == 1)
    return asked and varlen_usable(d.k[0], 0.0)


def _each_layer(d, x, cos, sin, span: Span, deepstack, whole: bool, attention) -> torch.Tensor:
    f = d._fns
    for i, w in enumerate(d.layers):
        if whole:
            x = f["packed_layer"](x, w.ln1, w.wqkv, w.qn, w.kn, w.wo, w.ln2, w.mlp, d.k[i], d.v[i], span.slot_of,
                                  span.index_of, cos, sin, span.cu, span.longest, span.key_cu, span.slot or 0,
                                  span.keys, d.n_q, d.n_kv, d.eps, d.scale, w.top_k)
        else:
            q, k, v = f["attn_in"](x, w.ln1, w.wqkv, w.qn, w.kn, cos, sin, d.n_q, d.n_kv, d.eps)
            d.k[i][span.slot_of, :, span.index_of] = k
            d.v[i][span.slot_of, :, span.index_of] = v
            x = f["mlp_out"](attention(i, q, k, v), x, w.wo, w.ln2, w.mlp, d.eps, w.top_k, "grouped")
        if i < len(deepstack):
            x = x + deepstack[i][0]
    return x


def _attention(d, span: Span):
    """``attention(layer, q, k, v)`` -> (T, Hq * D) for the pieces of :func:`_layers`."""
    if span.slot is None:
        return lambda i, q, k, v: attend(q, k, v, span.cu, span.bounds, span.longest, d.scale)
    return _on_cached(d, span)


def _on_device(d, *values) -> list[torch.Tensor]:
    """Host values as device tensors, copied before the prefill queues any work: a copy from pageable host memory
    waits until the GPU has done all work queued before it (an H100 profile of 8 prompts' prefill: 106 such
    waits, and the host then launched each next kernel onto an idle GPU)."""
    return [(v if torch.is_tensor(v) else torch.tensor(v)).to(d.device, non_blocking=True) for v in values]


def _occupancy(d, slots: list[int], lengths: list[int], deltas: list[int]) -> tuple:
    """What :func:`_occupy` writes, on the device already (:func:`_on_device`)."""
    return slots, lengths, _on_device(d, slots, lengths, deltas)


def _occupy(d, occupancy: tuple) -> None:
    """The decode state of prefilled slots (:func:`_occupancy`): each decodes from its prompt's end at its RoPE
    offset."""
    slots, lengths, (index, lengths_on, deltas_on) = occupancy
    for slot, n in zip(slots, lengths):
        d.host_length[slot] = n
        d.busy.add(slot)
    d.length[index] = lengths_on
    d.rope_delta[index] = deltas_on


@dataclass
class Row:
    """Prompts laid end to end, embedded: what the decoder layers take (:func:`embed`)."""

    embeds: torch.Tensor  # (T, H), the media's tower outputs in place
    deepstack: list  # (1, T, H) per DeepStack layer (zero away from visual tokens)
    cos: torch.Tensor  # (T, D) mRoPE
    sin: torch.Tensor
    positions: torch.Tensor  # (4, T) on the host: text positions, then the mRoPE rows
    lengths: list[int]


@torch.inference_mode()
def embed(d, encs: list, positions: list[torch.Tensor], media_keys: list | None = None, cache=None) -> Row:
    """The prompts ``encs`` (``positions``: each one's (4, L) text + mRoPE positions) as one embedded row: token
    embeddings, the vision tower's outputs at their placeholders (through ``cache``, a
    :class:`qvl.infer.vision_cache.VisionCache`, for the items with content keys: ``media_keys``, each prompt's
    {pixel key: [key per item]} or None), the DeepStack features and the rotary cos / sin."""
    from qvl.train.row_forward import row_inputs, vision_extras

    lengths = [len(e) for e in encs]
    if max(lengths) > d.max_len:
        from qvl.infer.decode import PromptTooLong

        raise PromptTooLong(f"prompt of {max(lengths)} tokens exceeds the cache length {d.max_len}")
    dev = d.device
    inner, config = d.base.model, d.base.config
    positions = torch.cat(positions, dim=1)
    batch = {"input_ids": torch.cat([e.input_ids for e in encs])[None].to(dev, non_blocking=True)}
    extras, keys, host_grids = {}, {}, {}
    for kind, pixel_key, grid_key in MEDIA:
        have = [i for i, e in enumerate(encs) if getattr(e, pixel_key) is not None]
        if not have:
            continue
        # pixels go to the device one prompt at a time and are joined and cast there (as DecodeModel's callers do)
        batch[pixel_key] = torch.cat([getattr(encs[i], pixel_key).to(dev, non_blocking=True).to(d.dtype)
                                      for i in have])
        host_grids[pixel_key] = torch.cat([getattr(encs[i], grid_key) for i in have])
        batch[grid_key] = host_grids[pixel_key].to(dev, non_blocking=True)
        for key, value in vision_extras(host_grids[pixel_key], config.vision_config).items():
            extras[f"{kind}_{key}"] = value.to(dev, non_blocking=True) if torch.is_tensor(value) else value
        per_prompt = [(media_keys[i] or {}).get(pixel_key) if media_keys else None for i in have]
        keys[pixel_key] = None if any(k is None for k in per_prompt) else [k for ks in per_prompt for k in ks]
    (mrope,) = _on_device(d, positions[1:, None])
    encode = _encoder(inner.visual, config.vision_config, cache, keys, host_grids, dev)
    embeds, deepstack = row_inputs(inner, config, batch, extras, encode)
    cos, sin = d.text.rotary_emb(embeds, mrope)
    return Row(embeds[0], deepstack, cos[0], sin[0], positions, lengths)


def _rope_delta(positions: torch.Tensor) -> int:
    """A prompt's RoPE offset for decoding: its largest mRoPE position + 1 - its length, as DecodeModel.prefill."""
    return int(positions[1:].max()) + 1 - positions.shape[1]


@torch.inference_mode()
def prefill(d, slots: list[int], encs: list, positions: list[torch.Tensor], media_keys: list | None = None,
            cache=None) -> torch.Tensor:
    """Run the prompts ``encs`` as one packed row (:func:`embed`) into ``slots`` of decoder ``d``; -> each prompt's
    last logits (B, V) float32, as :meth:`DecodeModel.prefill`."""
    lengths = [len(e) for e in encs]
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    bounds = list(zip(starts[:-1], starts[1:]))
    slot_of, index_of, cu, last = _on_device(
        d, torch.repeat_interleave(torch.tensor(slots), torch.tensor(lengths)),
        torch.cat([torch.arange(n) for n in lengths]), torch.tensor(starts, dtype=torch.int32), starts[1:])
    occupancy = _occupancy(d, slots, lengths, [_rope_delta(p) for p in positions])
    row = embed(d, encs, positions, media_keys, cache)
    span = Span(slot_of, index_of, cu, max(lengths), bounds=bounds)
    x = _layers(d, row.embeds, row.cos, row.sin, span, row.deepstack)
    logits = d._fns["final_logits"](x.index_select(0, last - 1), d.norm, d.head, d.eps)
    _occupy(d, occupancy)
    return logits


@torch.inference_mode()
def prefill_part(d, slot: int, row: Row, start: int, end: int) -> torch.Tensor | None:
    """Tokens ``start:end`` of the one-prompt ``row`` into ``slot``, on top of its first ``start`` entries (written
    by the parts before): a long prompt prefilled a part at a time, decode steps of the others between parts. ->
    the last logits (1, V) once ``end`` is the prompt's end (the slot then decodes from there), else None."""
    (n,) = row.lengths
    span = slot_span(d, slot, start, end)
    occupancy = _occupancy(d, [slot], [n], [_rope_delta(row.positions)]) if end == n else None
    x = _layers(d, row.embeds[start:end], row.cos[start:end], row.sin[start:end], span,
                [f[:, start:end] for f in row.deepstack])
    if occupancy is None:
        return None
    logits = d._fns["final_logits"](x[-1:], d.norm, d.head, d.eps)
    _occupy(d, occupancy)
    return logits


def _on_cached(d, span: Span):
    """``attention`` for :func:`_layers`' pieces of a slot's new tokens (``span``: :func:`slot_span`): each sees the
    slot's entries up to its own (those before the new ones written earlier).

    On a GPU, one flash varlen call whose key segment is the slot's first entries (the causal mask aligned to its
    end): the cached keys / values read as they are, grouped heads and all. A follow-up turn of 283 tokens on a
    1,094-token prompt took 23.4 ms, 3.7 of its 14.6 ms of kernels in the mask-reading sdpa kernel over every query
    head's copy of the keys (H100, 2026-12-07, bench/results/decode_followup_h100.json). Elsewhere sdpa with a mask,
    without cuDNN's kernel (:func:`qvl.models.attention.without_cudnn`: it plans each new shape on the host, and
    every follow-up turn brings a new (new tokens, keys) shape)."""
    from qvl.data.packing import varlen_causal, varlen_usable
    from qvl.models.attention import without_cudnn

    slot, index, n, t = span.slot, span.index, span.keys, len(span.index)
    if varlen_usable(d.k[0], 0.0):
        def attention(i, q, k, v):
            keys, values = (c[i][slot:slot + 1, :, :n] for c in (d.k, d.v))
            out = varlen_causal(q.transpose(0, 1)[None], keys, values, span.cu, t, d.scale, key_cu=span.key_cu,
                                key_max=n)
            return out[0].reshape(t, -1)

        return attention
    (mask,) = _on_device(d, torch.arange(n)[None, :] <= index[:, None])

    def attention(i, q, k, v):
        keys, values = (_all_heads(c[i][slot:slot + 1, :, :n], d.n_q) for c in (d.k, d.v))
        with without_cudnn():
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask,
                                                 scale=d.scale)
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    return attention


def warm(d) -> None:
    """Prefill three short text prompts into slots 0-2 (fewer where there are fewer), then a follow-up turn on top
    of each (:func:`rest`), and free them, so that the compiled layers meet a prefill's shapes before the first
    request does. The follow-up's new tokens attend to the slot's cache, with kernels a prefill does not use: the
    first follow-up turn after start-up waited 1.3 s longer than the next ones (H100, 2026-12-05, ``turns`` of
    bench/results/serve_h100.json)."""
    from qvl.data.preprocess import Encoded

    def text(n: int) -> Encoded:
        return Encoded(torch.zeros(n, dtype=torch.long), None, torch.zeros(n, dtype=torch.long))

    sizes = [n for n in (16, 24, 32)[:d.slots] if n + 16 <= d.max_len]
    if d.prefill_layers == "whole-if-single":  # a lone prompt's layers run whole, several prompts' as pieces: a
        for n in sizes[:2]:  # lone one too, at two lengths (the second compiles with dynamic shapes)
            prefill(d, [0], [text(n)], [torch.arange(n).expand(4, n)])
            d.release(0)
    prefill(d, list(range(len(sizes))), [text(n) for n in sizes], [torch.arange(n).expand(4, n) for n in sizes])
    # two lengths at least: a function compiled for one meets a second before a request; three slots: a whole
    # compiled layer takes the follow-up's slot as a number, and compiles for 0, 1 and any other
    for slot, n in enumerate(sizes):
        longer = n + 8 * (slot + 1)
        rest(d, slot, n, text(longer), torch.arange(longer).expand(4, longer))
    for slot in range(len(sizes)):
        d.release(slot)


@torch.inference_mode()
def rest(d, slot: int, start: int, enc, positions: torch.Tensor) -> torch.Tensor:
    """Run tokens ``start:`` of ``enc`` (text only: :func:`qvl.infer.prefix.find` makes sure) on top of slot
    ``slot``'s kept keys / values (its first ``start`` entries), as :func:`qvl.infer.prefix.prefill_rest`;
    -> last logits (1, V)."""
    n = len(enc)
    ids, mrope = _on_device(d, enc.input_ids[start:], positions[1:, None, start:])
    span = slot_span(d, slot, start, n)
    occupancy = _occupancy(d, [slot], [n], [_rope_delta(positions)])
    x = F.embedding(ids, d.embed)
    cos, sin = d.text.rotary_emb(x[None], mrope)
    x = _layers(d, x, cos[0], sin[0], span)
    logits = d._fns["final_logits"](x[-1:], d.norm, d.head, d.eps)
    _occupy(d, occupancy)
    return logits
