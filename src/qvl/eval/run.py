"""Run a model over a dataset split and score its answers (``qvl eval``).

Each sample's last assistant turn is the reference; everything before it is the prompt
(earlier gold turns included). Two ways to get the prediction:

- generation (default): greedy decoding, so runs are reproducible and base vs tuned comparisons
  are fair; scored by the reference's metric (match / choice / number / IoU@0.5, ``metrics``).
- closed-set (``choices=``): the candidate answer with the highest log-likelihood under the model
  (``qvl.eval.choices``); scored as metric ``choice-ll`` (normalised match with the reference).
  ``choices="auto"`` takes the split's distinct reference answers when there are at most 30.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from qvl.data.collate import collate
from qvl.data.preprocess import encode
from qvl.data.registry import RawRecord
from qvl.data.samples import Sample, parse_sample
from qvl.eval.metrics import aggregate, matches, score


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


def engine_generate(engine):
    """A ``generate`` for :func:`evaluate` that runs through a serving engine (``--backend vllm``): greedy, with
    every prompt of a batch in flight at once, so vLLM batches them itself. ``RequestError`` (a prompt longer
    than the context) stops the run with the engine's message."""
    from qvl.infer.types import Request

    def generate(prompts: list[Sample], max_new_tokens: int) -> list[str]:
        sampling = engine.sampling(temperature=0, presence_penalty=0.0, frequency_penalty=0.0,
                                   repetition_penalty=1.0, max_new_tokens=max_new_tokens)
        handles = [engine.stream(Request(p.messages, sampling)) for p in prompts]
        return [h.result().text.strip() for h in handles]

    return generate


def evaluate(model, processor, records: list[RawRecord], name: str = "model", batch_size: int = 8,
             max_new_tokens: int = 64, budget=None, progress=None, choices=None, generate=None) -> EvalResult:
    """Score ``model`` on ``records``.

    ``generate(prompts, max_new_tokens) -> answers`` replaces batched ``model.generate`` (e.g.
    :func:`engine_generate` for vLLM; ``model`` may then be None, closed-set scoring needs the model).

    ``choices``: None (greedy generation), ``"auto"`` (the distinct reference answers of these
    records, if at most 30, else generation with a warning), or a list / comma-separated string
    of candidate answers: closed-set scoring, metric ``choice-ll``. With choices, ``batch_size``
    counts (sample, candidate) sequences per forward.
    """
    from qvl.eval.choices import resolve_choices, score_candidates

    start = time.perf_counter()
    items, skipped = [], []
    for rec in records:
        sample, problems = parse_sample(rec.raw, rec.index, rec.data_path, rec.origin)
        split = split_prompt(sample) if sample is not None else None
        if split is None:
            skipped.append(f"{rec.origin}: " + ("; ".join(p.render() for p in problems) or "no assistant turn"))
            continue
        items.append((rec, *split))
    candidates = resolve_choices(choices, [ref for _, _, ref in items])
    predictions, scores = [], []
    step = batch_size if candidates is None else max(1, batch_size // max(len(candidates), 1))
    for b in range(0, len(items), step):
        chunk = items[b:b + step]
        prompts = [p for _, p, _ in chunk]
        if candidates is None:
            answers = (generate(prompts, max_new_tokens) if generate is not None
                       else generate_batch(model, processor, prompts, max_new_tokens, budget))
            extra = [{} for _ in chunk]
        else:
            ll = score_candidates(model, processor, prompts, candidates, budget, batch_size=max(batch_size, 1))
            best = ll.argmax(dim=1).tolist()
            answers = [candidates[k] for k in best]
            extra = [{"loglik": {candidates[k]: round(float(v), 4) for k, v in
                                 zip(row.argsort(descending=True)[:3].tolist(), row.sort(descending=True).values[:3])}}
                     for row in ll]
        for (rec, _, ref), pred, ex in zip(chunk, answers, extra):
            if candidates is None:
                s = score(pred, ref)
            else:
                s = {"metric": "choice-ll", "score": float(matches(pred, ref)),
                     "exact": float(pred.strip() == ref.strip())}
            scores.append(s)
            predictions.append({"origin": rec.origin, "reference": ref, "prediction": pred, **s, **ex})
        if progress:
            progress(len(predictions))
    summary = aggregate(scores)
    summary["mode"] = "generate" if candidates is None else "choices"
    if candidates is not None:
        summary["choices"] = candidates
        summary["chance"] = 1.0 / len(candidates)
        missing = sorted({ref.strip() for _, _, ref in items} - set(candidates))
        if missing:
            summary["references_not_in_choices"] = missing[:20]
    return EvalResult(name, summary, predictions, skipped, time.perf_counter() - start)


def comparison_rows(results: list[EvalResult]) -> list[list[str]]:
    """Rows of a side-by-side table: overall score, exact match, then each metric."""
    metrics = sorted({k for r in results for k, v in r.summary.items() if isinstance(v, dict)})
    rows = [["samples"] + [str(r.summary.get("n", 0)) for r in results],
            ["score (overall)"] + [f"{r.summary.get('score', 0):.3f}" for r in results],
            ["exact match"] + [f"{r.summary.get('exact', 0):.3f}" for r in results]]
    if any("chance" in r.summary for r in results):
        rows.append(["chance (closed-set)"] + [f"{r.summary['chance']:.3f}" if "chance" in r.summary else "-"
                                               for r in results])
    for m in metrics:
        rows.append([f"{m} (n={results[0].summary.get(m, {}).get('n', 0)})"] +
                    [f"{r.summary[m]['score']:.3f}" if m in r.summary else "-" for r in results])
    return rows
