"""Run a model over a dataset split and score its answers (``qvl eval``).

Each sample's last assistant turn is the reference; everything before it is the prompt
(earlier gold turns included). Decoding is greedy so runs are reproducible and base vs
tuned comparisons are fair.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from qvl.data.collate import collate
from qvl.data.preprocess import encode
from qvl.data.registry import RawRecord
from qvl.data.samples import Sample, parse_sample
from qvl.eval.metrics import aggregate, score


@dataclass
class EvalResult:
    name: str
    summary: dict
    predictions: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def split_prompt(sample: Sample) -> tuple[Sample, str] | None:
    """(prompt sample, reference answer) from the last assistant turn, or None if there is none."""
    for i in range(len(sample.messages) - 1, -1, -1):
        if sample.messages[i].role == "assistant":
            return Sample(sample.messages[:i], sample.index, sample.origin), sample.messages[i].text
    return None


@torch.no_grad()
def generate_batch(model, processor, prompts: list[Sample], max_new_tokens: int, budget=None) -> list[str]:
    encs = [encode(p, processor, budget, for_generation=True) for p in prompts]
    batch = collate(encs, processor.tokenizer.pad_token_id, padding_side="left")
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                         top_k=None, pad_token_id=processor.tokenizer.pad_token_id)
    new = out[:, batch["input_ids"].shape[1]:]
    return [t.strip() for t in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


def evaluate(model, processor, records: list[RawRecord], name: str = "model", batch_size: int = 8,
             max_new_tokens: int = 64, budget=None, progress=None) -> EvalResult:
    start = time.perf_counter()
    items, skipped = [], []
    for i, rec in enumerate(records):
        sample, problems = parse_sample(rec.raw, i, rec.data_path, rec.origin)
        split = split_prompt(sample) if sample is not None else None
        if split is None:
            skipped.append(f"{rec.origin}: " + ("; ".join(p.render() for p in problems) or "no assistant turn"))
            continue
        items.append((rec, *split))
    predictions, scores = [], []
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        answers = generate_batch(model, processor, [p for _, p, _ in chunk], max_new_tokens, budget)
        for (rec, _, ref), pred in zip(chunk, answers):
            s = score(pred, ref)
            scores.append(s)
            predictions.append({"origin": rec.origin, "reference": ref, "prediction": pred, **s})
        if progress:
            progress(len(predictions))
    return EvalResult(name, aggregate(scores), predictions, skipped, time.perf_counter() - start)


def comparison_rows(results: list[EvalResult]) -> list[list[str]]:
    """Rows of a side-by-side table: overall score, exact match, then each metric."""
    metrics = sorted({k for r in results for k, v in r.summary.items() if isinstance(v, dict)})
    rows = [["samples"] + [str(r.summary.get("n", 0)) for r in results],
            ["score (overall)"] + [f"{r.summary.get('score', 0):.3f}" for r in results],
            ["exact match"] + [f"{r.summary.get('exact', 0):.3f}" for r in results]]
    for m in metrics:
        rows.append([f"{m} (n={results[0].summary.get(m, {}).get('n', 0)})"] +
                    [f"{r.summary[m]['score']:.3f}" if m in r.summary else "-" for r in results])
    return rows
