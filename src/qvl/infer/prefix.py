"""Prefix reuse across chat turns: a follow-up prefills only what its finished predecessor's slot lacks.

A freed cache slot still holds the keys/values of the prompt it served (decode steps of other rows
write a free slot's entry at its parked position, the cache's last index, never inside a prompt).
When a new request's tokens start with that whole prompt -- the same token ids and the same images
and videos, by content key -- and the rest holds no media, the request takes that slot and only the
rest is run, with the kept prompt as the attention cache. In a chat, turn 2's prompt is turn 1's
prompt followed by the answer and the new question, so the image and everything before it are not
run again. Reuse is opportunistic: new requests take slots that keep nothing first, then the slots
whose prompts were kept longest ago, which lose what they kept.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

MIN_TOKENS = 32  # a shorter kept prompt is not worth a separate prefill


_serial = itertools.count()


@dataclass
class Kept:
    ids: torch.Tensor  # the prompt's token ids (host)
    keys: dict  # its media content keys ({pixel key: [key per item]}, qvl.infer.vision_cache.media_keys)
    serial: int = field(default_factory=lambda: next(_serial))  # older prompts are given away first


def find(kept: dict[int, Kept], free: list[int], enc, keys: dict | None, max_len: int) -> tuple[int, int] | None:
    """(slot, kept length) of the longest kept prompt in a ``free`` slot that ``enc`` continues, or None."""
    best = None
    n = len(enc)
    for slot in free:
        k = kept.get(slot)
        if k is None:
            continue
        p = len(k.ids)
        if p < MIN_TOKENS or p >= n or p > max_len - 2 or (best and p <= best[1]):
            continue
        if enc.mm_token_type_ids[p:].any():  # media after the kept part: not handled, prefill it all
            continue
        if not torch.equal(enc.input_ids[:p], k.ids):
            continue
        if not keys and enc.mm_token_type_ids[:p].any():
            continue  # media without content keys (the vision cache off): the same tokens may hold other pixels
        mine = keys or {}
        if any(mine.get(kind, [])[:len(items)] != items for kind, items in k.keys.items()):
            continue  # the same placeholder tokens, other pixels
        if sum(len(v) for v in mine.values()) != sum(len(v) for v in k.keys.values()):
            continue
        best = (slot, p)
    return best


def prefill_rest(d, slot: int, start: int, enc) -> torch.Tensor:
    """Run tokens ``start:`` of ``enc`` on top of slot ``slot``'s kept keys/values (its first ``start`` entries),
    write theirs after them and make the slot decode from the prompt's end; -> last logits (1, V)."""
    from transformers import DynamicCache

    n = len(enc)
    positions = enc.positions  # (4, n): text positions, then the mRoPE rows
    cache = DynamicCache()
    for layer in range(len(d.k)):
        cache.update(d.k[layer][slot:slot + 1, :, :start], d.v[layer][slot:slot + 1, :, :start], layer)
    name = "cache" if "cache" in inspect.signature(d.base.model.forward).parameters else "past_key_values"
    out = d.base.model(input_ids=enc.input_ids[None, start:].to(d.device),
                       position_ids=positions[:, None, start:].to(d.device), use_cache=True, **{name: cache})
    from qvl.infer.decode import _cache_layers

    for layer, (k, v) in enumerate(_cache_layers(getattr(out, "cache", None) or out.past_key_values)):
        d.k[layer][slot, :, start:n] = k[0, :, start:n]
        d.v[layer][slot, :, start:n] = v[0, :, start:n]
    d.host_length[slot] = n
    d.busy.add(slot)
    d.length[slot] = n
    d.rope_delta[slot] = int(positions[1:].max()) + 1 - n  # as DecodeModel.prefill
    return F.linear(out.last_hidden_state[:, -1], d.head).float()
