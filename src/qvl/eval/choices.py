"""Closed-set scoring: pick the candidate answer the model finds most likely.

Greedy generation asks a model to *write* the answer; a model that knows the answer but not
the output format (or a random model, which writes nothing valid) scores 0 and the comparison
says little. Closed-set scoring instead ranks a fixed list of candidate answers by their
log-likelihood under the model, teacher-forced after the prompt:

    ll(candidate) = sum over the candidate's tokens and its <|im_end|> of log p(token | prompt, previous tokens)

and predicts the best one (the sum, not the mean: a candidate must also *end* where it ends).
A random model then scores at chance level (it picks by its arbitrary preferences), a trained
one by what it learnt, so base vs tuned numbers are comparable. Candidates are tokenised
exactly as training tokenises an assistant reply (after ``<|im_start|>assistant\\n``).

Cost: one forward of prompt + candidate per (sample, candidate) pair, batched; the LM head runs
only on candidate positions, so memory does not grow with the vocabulary times the prompt.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from qvl.data.collate import collate
from qvl.data.preprocess import IGNORE_INDEX, Encoded, encode
from qvl.data.samples import Sample
from qvl.models.tokens import token_ids

AUTO_MAX = 30  # "auto" uses the split's distinct references when there are at most this many


def resolve_choices(choices, references: list[str], max_auto: int = AUTO_MAX) -> list[str] | None:
    """The candidate list for ``choices`` (None, "auto", "a,b,c" or a list), or None for generation.

    "auto" is the sorted set of distinct (stripped) references of the split; with more than
    ``max_auto`` of them the task is not closed-set and generation is used, with a warning.
    """
    if choices is None:
        return None
    if isinstance(choices, str):
        if choices.strip().lower() == "auto":
            distinct = sorted({r.strip() for r in references})
            if len(distinct) > max_auto:
                warnings.warn(f"--choices auto: the split has {len(distinct)} distinct answers (more than "
                              f"{max_auto}), so it is not a closed-set task; scoring generated answers instead",
                              stacklevel=2)
                return None
            return distinct
        choices = choices.split(",")
    out = list(dict.fromkeys(c.strip() for c in choices if c.strip()))
    if not out:
        from qvl.errors import QvlError

        raise QvlError(f"no candidate answer in choices {choices!r}", where="--choices",
                       fix="pass 'auto' or comma-separated answers, e.g. --choices 'red,green,blue'")
    return out


def candidate_ids(tokenizer, candidate: str) -> list[int]:
    """Token ids of ``candidate`` as an assistant reply, its <|im_end|> included (training's tokenisation)."""
    ids = token_ids(tokenizer)
    head = "<|im_start|>assistant\n"
    prefix = tokenizer.encode(head, add_special_tokens=False)
    full = tokenizer.encode(head + candidate + "<|im_end|>", add_special_tokens=False)
    if full[:len(prefix)] == prefix and full[-1] == ids.im_end:
        return full[len(prefix):]
    return tokenizer.encode(candidate, add_special_tokens=False) + [ids.im_end]  # reply merged into the newline


def _with_candidate(prompt: Encoded, cand: list[int]) -> Encoded:
    c = torch.tensor(cand, dtype=prompt.input_ids.dtype)
    return Encoded(
        input_ids=torch.cat([prompt.input_ids, c]),
        labels=torch.cat([torch.full_like(prompt.input_ids, IGNORE_INDEX), c]),
        mm_token_type_ids=torch.cat([prompt.mm_token_type_ids, torch.zeros_like(c, dtype=prompt.mm_token_type_ids.dtype)]),
        pixel_values=prompt.pixel_values, image_grid_thw=prompt.image_grid_thw,
        pixel_values_videos=prompt.pixel_values_videos, video_grid_thw=prompt.video_grid_thw, origin=prompt.origin,
    )


@torch.no_grad()
def sequence_loglik(model, batch: dict) -> torch.Tensor:
    """Per row: sum of log p(label token) over the positions whose label is not IGNORE_INDEX."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = next(base.parameters()).device
    labels = batch["labels"].to(device)
    inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    hidden = base.model(**inputs, use_cache=False).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    logp = F.log_softmax(base.lm_head(hidden[keep]).float(), dim=-1)
    tok = logp.gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
    rows = keep.nonzero()[:, 0]
    return torch.zeros(labels.shape[0], device=device).index_add_(0, rows, tok).cpu()


@torch.no_grad()
def score_candidates(model, processor, prompts: list[Sample], candidates: list[str], budget=None,
                     batch_size: int = 8) -> torch.Tensor:
    """[len(prompts), len(candidates)] total log-likelihood of each candidate reply after each prompt.

    ``batch_size`` counts (prompt, candidate) sequences per forward; each prompt is encoded (and
    its media loaded) once.
    """
    tok = processor.tokenizer
    cand = [candidate_ids(tok, c) for c in candidates]
    pad = tok.pad_token_id
    out = torch.empty(len(prompts), len(candidates))
    pairs = [(i, j) for i in range(len(prompts)) for j in range(len(candidates))]
    encoded: dict[int, Encoded] = {}
    for b in range(0, len(pairs), max(1, batch_size)):
        chunk = pairs[b:b + max(1, batch_size)]
        rows = []
        for i, j in chunk:
            if i not in encoded:
                encoded.clear()  # pairs are in prompt order: keep only the current prompt's encoding
                encoded[i] = encode(prompts[i], processor, budget, for_generation=True)
            rows.append(_with_candidate(encoded[i], cand[j]))
        ll = sequence_loglik(model, collate(rows, pad, "right"))
        for (i, j), v in zip(chunk, ll.tolist()):
            out[i, j] = v
    return out
