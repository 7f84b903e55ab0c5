"""Closed-set scoring (``evaluate(..., choices=...)``) on hand-made cases."""

import warnings

import pytest
import torch

from qvl.data.collate import collate
from qvl.data.preprocess import encode
from qvl.data.registry import RawRecord
from qvl.data.samples import parse_sample
from qvl.eval import choices as C
from qvl.eval.run import comparison_rows, evaluate, split_prompt


def _records(tmp_path, pairs):
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in pairs]
    return [RawRecord(r, tmp_path, "t", i) for i, r in enumerate(rows)]


def test_resolve_choices():
    assert C.resolve_choices(None, ["a"]) is None
    assert C.resolve_choices("auto", ["red ", "blue", "red"]) == ["blue", "red"]
    assert C.resolve_choices("red, blue,,red", []) == ["red", "blue"]
    assert C.resolve_choices(["x", "y"], []) == ["x", "y"]
    with pytest.warns(UserWarning, match="not a closed-set task"):
        assert C.resolve_choices("auto", [str(i) for i in range(31)]) is None
    from qvl.errors import QvlError

    with pytest.raises(QvlError, match="--choices"):  # a message on the command line, not a traceback
        C.resolve_choices(" , ", [])


def test_candidate_ids_match_training_tokenisation(tiny_processor):
    """The candidate's ids are exactly the label ids training puts on that reply (reply + <|im_end|>)."""
    tok = tiny_processor.tokenizer
    for answer in ("red", "triangle", "a blue square", "3"):
        sample, _ = parse_sample({"conversations": [{"from": "human", "value": "q?"}, {"from": "gpt", "value": answer}]})
        labels = encode(sample, tiny_processor).labels
        assert C.candidate_ids(tok, answer) == labels[labels != -100].tolist()


def _brute_force_ll(model, processor, prompt, answer):
    """log p(answer + <|im_end|> | prompt) token by token from full-vocabulary logits."""
    enc = encode(prompt, processor, for_generation=True)
    cand = C.candidate_ids(processor.tokenizer, answer)
    ids = torch.cat([enc.input_ids, torch.tensor(cand)])[None]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logp = logits.log_softmax(-1)
    start = len(enc.input_ids)
    return sum(float(logp[start - 1 + k, t]) for k, t in enumerate(cand))


def test_score_candidates_equals_brute_force(tiny, tmp_path):
    """Batched, padded, LM head on candidate positions only == plain per-token log-probs."""
    model, processor = tiny
    recs = _records(tmp_path, [("What colour is the circle?", "red"), ("Name a shape, please", "square")])
    prompts = [split_prompt(parse_sample(r.raw)[0])[0] for r in recs]
    cands = ["red", "blue square", "triangle"]
    got = C.score_candidates(model, processor, prompts, cands, batch_size=4)  # chunks cross prompt boundaries
    assert got.shape == (2, 3)
    for i, p in enumerate(prompts):
        for j, c in enumerate(cands):
            assert got[i, j].item() == pytest.approx(_brute_force_ll(model, processor, p, c), abs=1e-3)


def test_evaluate_with_choices_picks_the_most_likely(tiny, tmp_path, monkeypatch):
    """A model whose preferences we control: it always prefers the candidate named in the prompt."""
    model, processor = tiny
    recs = _records(tmp_path, [("say red", "red"), ("say blue", "blue"), ("say green", "red")])

    def fake(model, processor, prompts, candidates, budget=None, batch_size=8):
        out = torch.zeros(len(prompts), len(candidates))
        for i, p in enumerate(prompts):
            word = p.messages[-1].text.split()[-1]
            out[i, candidates.index(word) if word in candidates else 0] = 1.0
        return out

    monkeypatch.setattr(C, "score_candidates", fake)
    res = evaluate(model, processor, recs, choices="auto")
    assert res.summary["mode"] == "choices" and res.summary["choices"] == ["blue", "red"]
    assert [p["prediction"] for p in res.predictions] == ["red", "blue", "blue"]
    assert res.summary["choice-ll"] == {"n": 3, "score": pytest.approx(2 / 3)}
    assert res.summary["chance"] == 0.5
    rows = {r[0]: r[1] for r in comparison_rows([res])}
    assert rows["chance (closed-set)"] == "0.500" and rows["choice-ll (n=3)"] == "0.667"

    res = evaluate(model, processor, recs, choices=["green", "red", "blue"])  # explicit list
    assert [p["prediction"] for p in res.predictions] == ["red", "blue", "green"]
    assert res.summary["score"] == pytest.approx(2 / 3)


def test_auto_with_too_many_answers_falls_back_to_generation(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    recs = _records(tmp_path, [(f"q{i}", f"answer {i}") for i in range(31)])
    from qvl.eval import run

    monkeypatch.setattr(run, "generate_batch", lambda m, p, prompts, n, budget=None: ["answer 0"] * len(prompts))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = evaluate(model, processor, recs, choices="auto")
    assert any("not a closed-set task" in str(w.message) for w in caught)
    assert res.summary["mode"] == "generate" and res.summary["score"] == pytest.approx(1 / 31)


def test_random_model_is_near_chance_not_zero(tiny, tmp_path):
    """The untrained tiny model on the real scorer: every prediction is a valid candidate."""
    model, processor = tiny
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    recs = _records(tmp_path, [(f"What colour is shape {i}?", colours[i % 6]) for i in range(12)])
    res = evaluate(model, processor, recs, choices=colours, batch_size=24)
    assert all(p["prediction"] in colours for p in res.predictions)
    assert all(len(p["loglik"]) == 3 for p in res.predictions)
    # a random model prefers some answers whatever the input: its score is the share of those answers
    assert 0 < res.summary["score"] < 0.7


def test_choices_with_images(tiny, tmp_path):
    """Media are encoded once per prompt and repeated per candidate row; rows of one batch agree with singles."""
    from PIL import Image

    model, processor = tiny
    Image.new("RGB", (64, 64), (220, 40, 40)).save(tmp_path / "r.jpg")
    raw = {"image": "r.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                               {"from": "gpt", "value": "red"}]}
    prompt = split_prompt(parse_sample(raw, 0, tmp_path)[0])[0]
    both = C.score_candidates(model, processor, [prompt], ["red", "blue"], batch_size=2)
    one = [C.score_candidates(model, processor, [prompt], [c], batch_size=1)[0, 0] for c in ("red", "blue")]
    assert torch.allclose(both[0], torch.stack(one), atol=1e-4)
    enc = encode(prompt, processor, for_generation=True)
    assert collate([C._with_candidate(enc, [1, 2])], 0)["pixel_values"].shape == enc.pixel_values.shape
