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

from dataclasses import dataclass

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


@dataclass
class RowParams:
    """Sampling settings of a fixed list of rows, as device tensors (built once per change of rows, so a
    decode step copies nothing from the host)."""

    slots: torch.Tensor  # (R,) the rows' cache slots
    params: list
    generators: list
    greedy: torch.Tensor  # (R,) bool
    temperature: torch.Tensor  # (R, 1); 1 for greedy rows
    top_k: torch.Tensor  # (R, 1); the vocabulary size when off
    k_max: int
    top_p: torch.Tensor  # (R, 1)
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    all_greedy: bool
    any_presence: bool
    any_repetition: bool


def _dev(values, dtype, device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # no wait for the work already queued
    return t.to(device)


def row_params(slots: list[int], params: list[SamplingParams], generators: list, vocab: int, device) -> RowParams:
    ks = [p.top_k if p.top_k > 0 else vocab for p in params]
    col = lambda values, dtype=torch.float32: _dev([[v] for v in values], dtype, device)  # noqa: E731
    return RowParams(
        slots=_dev(slots, torch.long, device), params=params, generators=generators,
        greedy=_dev([p.greedy for p in params], torch.bool, device),
        temperature=col([1.0 if p.greedy else p.temperature for p in params]),
        top_k=col(ks, torch.long), k_max=min(max(ks), vocab), top_p=col([p.top_p for p in params]),
        presence=col([p.presence_penalty for p in params]), frequency=col([p.frequency_penalty for p in params]),
        repetition=col([p.repetition_penalty for p in params]),
        all_greedy=all(p.greedy for p in params),
        any_presence=any(p.presence_penalty or p.frequency_penalty for p in params),
        any_repetition=any(p.repetition_penalty != 1.0 for p in params))


def _penalise(logits: torch.Tensor, rp: RowParams, stats: TokenStats) -> torch.Tensor:
    if rp.any_repetition and stats.seen is not None:
        r = rp.repetition
        logits = torch.where(stats.seen[rp.slots], torch.where(logits > 0, logits / r, logits * r), logits)
    if rp.any_presence and stats.counts is not None:
        counts = stats.counts[rp.slots]
        logits = logits - rp.presence * (counts > 0).to(logits.dtype) - rp.frequency * counts
    return logits


def _draw(scores: torch.Tensor, rp: RowParams) -> torch.Tensor:
    """Temperature, top-k, top-p and a draw; scores (R, V) float32 -> tokens (R,). No host synchronisation."""
    scores = scores / rp.temperature
    vals, idx = scores.topk(rp.k_max, dim=-1)  # sorted, largest first
    rank = torch.arange(rp.k_max, device=scores.device)[None, :]
    vals = vals.masked_fill(rank >= rp.top_k, float("-inf"))
    probs = torch.softmax(vals, dim=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token always stays)
    before = torch.cumsum(probs, dim=-1) - probs
    probs = probs.masked_fill(before >= rp.top_p, 0.0)
    if all(g is None for g in rp.generators):
        out = torch.multinomial(probs, 1).squeeze(1)
    else:
        out = torch.multinomial(probs, 1).squeeze(1)
        for i, g in enumerate(rp.generators):
            if g is not None:  # a seeded row draws from its own generator, whatever shares the batch
                out[i] = torch.multinomial(probs[i:i + 1], 1, generator=g).squeeze()
    return idx.gather(1, out[:, None]).squeeze(1)


def choose(logits: torch.Tensor, rp: RowParams, stats: TokenStats) -> torch.Tensor:
    """Next token of each row. logits (R, V) float32 for the rows of ``rp``; -> (R,) long on the device."""
    logits = _penalise(logits, rp, stats)
    tokens = logits.argmax(dim=-1)
    if not rp.all_greedy:
        tokens = torch.where(rp.greedy, tokens, _draw(logits, rp))
    stats.add(rp.slots, tokens)
    return tokens
