"""Batched next-token choice for rows that each carry their own sampling settings.

The order is transformers' (what ``model.generate`` does with qvl's presence processor):
repetition penalty over prompt + generated tokens -> presence / frequency penalties over the
generated tokens -> greedy argmax, or temperature -> top-k -> top-p -> a draw. A seeded row draws
from its own generator, so its output does not depend on which other rows share the batch.

Per-slot token statistics live on the device (``counts``: how often each token was generated,
``seen``: which tokens the prompt or the output holds) and are only touched when a row asks for
a penalty.
"""

from __future__ import annotations

import torch

from qvl.infer.types import SamplingParams


class TokenStats:
    """Per-slot generated-token counts and seen-token masks for the penalties."""

    def __init__(self, slots: int, vocab: int, device):
        self.slots, self.vocab, self.device = slots, vocab, device
        self.counts: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    def start(self, slot: int, prompt_ids: list[int], sampling: SamplingParams) -> None:
        if sampling.presence_penalty or sampling.frequency_penalty:
            if self.counts is None:
                self.counts = torch.zeros(self.slots, self.vocab, device=self.device)
            self.counts[slot].zero_()
        if sampling.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.slots, self.vocab, dtype=torch.bool, device=self.device)
            self.seen[slot].zero_()
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < self.vocab], dtype=torch.long, device=self.device)
            self.seen[slot, ids] = True

    def add(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.counts is not None:
            self.counts[slots, tokens] += 1
        if self.seen is not None:
            self.seen[slots, tokens] = True


def _penalise(logits: torch.Tensor, slots: torch.Tensor, params: list[SamplingParams], stats: TokenStats):
    dev = logits.device
    rep = [p.repetition_penalty for p in params]
    if stats.seen is not None and any(r != 1.0 for r in rep):
        r = torch.tensor(rep, device=dev)[:, None]
        seen = stats.seen[slots]
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    pres = [p.presence_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    if stats.counts is not None and (any(pres) or any(freq)):
        counts = stats.counts[slots]
        logits = (logits - torch.tensor(pres, device=dev)[:, None] * (counts > 0).to(logits.dtype)
                  - torch.tensor(freq, device=dev)[:, None] * counts)
    return logits


def _draw(scores: torch.Tensor, params: list[SamplingParams], generators: list) -> torch.Tensor:
    """Temperature, top-k, top-p and a draw for rows that sample; scores (R, V) float32 -> tokens (R,)."""
    dev = scores.device
    scores = scores / torch.tensor([p.temperature for p in params], device=dev)[:, None]
    ks = [p.top_k if p.top_k > 0 else scores.shape[1] for p in params]
    k_max = min(max(ks), scores.shape[1])
    vals, idx = scores.topk(k_max, dim=-1)  # sorted, largest first
    rank = torch.arange(k_max, device=dev)[None, :]
    vals = vals.masked_fill(rank >= torch.tensor(ks, device=dev)[:, None], float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(before >= top_p, 0.0)
    out = torch.empty(len(params), dtype=torch.long, device=dev)
    shared = [i for i, g in enumerate(generators) if g is None]
    if shared:
        rows = torch.tensor(shared, device=dev)
        out[rows] = torch.multinomial(probs[rows], 1).squeeze(1)
    for i, g in enumerate(generators):
        if g is not None:
            out[i] = torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze()
    return idx.gather(1, out[:, None]).squeeze(1)


def choose(logits: torch.Tensor, slots: list[int], params: list[SamplingParams], stats: TokenStats,
           generators: list) -> torch.Tensor:
    """Next token of each row. logits (R, V) float32 for the rows of ``slots``; -> (R,) long on the device."""
    slot_t = torch.tensor(slots, device=logits.device)
    logits = _penalise(logits, slot_t, params, stats)
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = logits.argmax(dim=-1)
    else:
        tokens = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        picked = _draw(logits[rows], [params[i] for i in rows], [generators[i] for i in rows])
        tokens[torch.tensor(rows, device=logits.device)] = picked
    stats.add(slot_t, tokens)
    return tokens
