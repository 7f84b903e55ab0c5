import json

from typer.testing import CliRunner

from qvl.cli.main import app
from qvl.data.registry import RawRecord
from qvl.data.samples import parse_sample
from qvl.eval.run import evaluate, split_prompt


def test_split_prompt_uses_the_last_assistant_turn():
    raw = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]}
    sample, _ = parse_sample(raw)
    prompt, ref = split_prompt(sample)
    assert ref == "d" and [m.role for m in prompt.messages] == ["user", "assistant", "user"]


def test_evaluate_scores_generated_answers(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "red"}]} for i in range(3)]
    recs = [RawRecord(r, tmp_path, "t", i) for i, r in enumerate(rows)]
    import qvl.eval.run as run

    monkeypatch.setattr(run, "generate_batch", lambda m, p, prompts, n, budget=None: ["Red.", "blue", "red"][:len(prompts)])
    res = evaluate(model, processor, recs, batch_size=8)
    assert res.summary["n"] == 3 and abs(res.summary["score"] - 2 / 3) < 1e-9
    assert [p["prediction"] for p in res.predictions] == ["Red.", "blue", "red"]


def test_skipped_sample_is_named_by_its_index_in_its_file(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]}
    recs = [RawRecord(good, tmp_path, "a.jsonl", 0), RawRecord({"conversations": []}, tmp_path, "b.jsonl", 7)]
    import qvl.eval.run as run

    monkeypatch.setattr(run, "generate_batch", lambda m, p, prompts, n, budget=None: ["red"] * len(prompts))
    res = evaluate(model, processor, recs)
    assert res.summary["n"] == 1 and len(res.skipped) == 1
    assert res.skipped[0].startswith("b.jsonl:7: sample 7:"), res.skipped  # not "sample 1" (its place in the mix)


def test_eval_cli_compare_writes_outputs(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]}) + "\n"
                            for _ in range(2)))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "--compare", str(tiny_model_dir), str(tiny_model_dir), "--data", str(data),
                                   "--out", str(out), "--max-new-tokens", "3", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "eval.json").read_text())
    assert [r["model"] for r in summary["results"]] == [str(tiny_model_dir)] * 2
    assert len(list(out.glob("predictions-*.jsonl"))) == 2
    assert "score (overall)" in res.output
    preds = [json.loads(line) for line in (out / "predictions-0.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and preds[0]["reference"] == "red"


def test_eval_cli_refuses_a_zero_batch_or_negative_limit(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"}]}))
    for args in (["--batch-size", "0"], ["--limit", "-1"]):  # were a traceback (range step 0) / a silent cut
        res = CliRunner().invoke(app, ["eval", str(tiny_model_dir), "--data", str(data), "--device", "cpu",
                                       "--out", str(tmp_path / "out"), *args])
        assert res.exit_code == 2 and args[0] in res.output, res.output
