"""Scoring one prediction against one reference answer.

The metric follows the reference: grounding answers (``bbox_2d`` JSON) are scored by box
matching at IoU >= 0.5, a single option letter by multiple-choice accuracy, a number by
numeric equality, anything else by normalised match (lower case, no punctuation or articles,
collapsed spaces). Exact match is reported for every sample too.
"""

from __future__ import annotations

import re
import string

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_CHOICE = re.compile(r"^\(?([A-H])[\).:]?$")
_CHOICE_IN_PRED = re.compile(r"(?:^|\b(?:answer|option)\s*(?:is)?\s*:?\s*)\(?([A-H])\b[\).:]?", re.I)
_NUMBER_WORDS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve".split())}


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(\D|$))")
_AROUND_NUMBER = string.punctuation.replace("-", "").replace("+", "").replace(".", "")


def _number(text: str) -> float | None:
    """The number ``text`` states ("3.5", "-2", "1,000", "$5", "three"), or None.

    Read before punctuation is stripped: a decimal point and a minus sign are part of the value.
    """
    t = _THOUSANDS.sub("", text.strip().lower().replace(" ", "")).strip(_AROUND_NUMBER)
    t = t[:-1] if t.endswith(".") and not t.endswith("..") else t  # a sentence's full stop
    if _NUMBER.fullmatch(t):
        return float(t)
    word = normalise(text)
    return float(_NUMBER_WORDS[word]) if word in _NUMBER_WORDS else None


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _boxes(text: str) -> list[list[float]]:
    from qvl.data.grounding import parse_grounding

    out = []
    for item in parse_grounding(text):
        box = item.get("bbox_2d") if isinstance(item, dict) else None
        if isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box):
            out.append([float(v) for v in box])
    return out


def box_match(pred_boxes: list, ref_boxes: list, threshold: float = 0.5) -> float:
    """Greedy one-to-one matching by IoU; matched / max(#pred, #ref), so extra boxes cost too."""
    if not ref_boxes and not pred_boxes:
        return 1.0
    pairs = sorted(((iou(p, r), i, j) for i, p in enumerate(pred_boxes) for j, r in enumerate(ref_boxes)), reverse=True)
    used_p, used_r, matched = set(), set(), 0
    for score, i, j in pairs:
        if score < threshold:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            matched += 1
    return matched / max(len(pred_boxes), len(ref_boxes))


def metric_for(reference: str) -> str:
    if "bbox_2d" in reference and _boxes(reference):
        return "iou@0.5"
    if _CHOICE.match(reference.strip()):
        return "choice"
    if _number(reference) is not None:
        return "number"
    return "match"


def score(prediction: str, reference: str) -> dict:
    """{'metric', 'score' (0..1), 'exact'} for one sample."""
    pred, ref = prediction.strip(), reference.strip()
    metric = metric_for(ref)
    if metric == "iou@0.5":
        value = box_match(_boxes(pred), _boxes(ref))
    elif metric == "choice":
        m = _CHOICE_IN_PRED.search(pred)
        value = float(bool(m) and m.group(1).upper() == _CHOICE.match(ref).group(1))
    elif metric == "number":
        value = float(_number(pred) == _number(ref))
    else:
        value = float(matches(pred, ref))
    return {"metric": metric, "score": value, "exact": float(pred == ref)}


def matches(prediction: str, reference: str) -> bool:
    """Normalised match; a reference that normalises to nothing ("a", "The") is compared case-blind instead."""
    ref = normalise(reference)
    if not ref:
        return prediction.strip().lower() == reference.strip().lower()
    return normalise(prediction) == ref


def aggregate(scores: list[dict]) -> dict:
    """Mean score overall and per metric, with counts."""
    out: dict = {"n": len(scores)}
    if not scores:
        return out
    out["score"] = sum(s["score"] for s in scores) / len(scores)
    out["exact"] = sum(s["exact"] for s in scores) / len(scores)
    for metric in sorted({s["metric"] for s in scores}):
        sel = [s["score"] for s in scores if s["metric"] == metric]
        out[metric] = {"n": len(sel), "score": sum(sel) / len(sel)}
    return out
