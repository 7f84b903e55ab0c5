import json
import os

import pytest
from typer.testing import CliRunner

from helpers import write_image, write_video
from qvl.cli.main import app
from qvl.data.check import check_records, summarize
from qvl.data.registry import load_mixture


@pytest.fixture
def dataset(tmp_path):
    """A dataset with one sample per kind of problem, plus clean samples."""
    d = tmp_path / "ds"
    (d / "img").mkdir(parents=True)
    write_image(d / "img" / "ok.png", 120, 80)
    write_image(d / "img" / "thin.png", 1000, 4)
    (d / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write_video(d / "clip.mp4")
    (d / "broken.mp4").write_bytes(b"not a video at all")
    ok = {"image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                   {"from": "gpt", "value": "red"}]}
    rows = {
        "clean_image": ok,
        "clean_video": {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\nWhere?"},
                                                               {"from": "gpt", "value": "left"}]},
        "clean_text": {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        "clean_bbox": {"image": "img/ok.png", "conversations": [
            {"from": "human", "value": "<image>Find it."},
            {"from": "gpt", "value": '[{"bbox_2d": [10, 20, 500, 600], "label": "square"}]'}]},
        "missing_file": {"image": "img/nope.png", "conversations": ok["conversations"]},
        "corrupt_image": {"image": "img/corrupt.png", "conversations": ok["conversations"]},
        "aspect_ratio": {"image": "img/thin.png", "conversations": ok["conversations"]},
        "broken_video": {"video": "broken.mp4", "conversations": [{"from": "human", "value": "<video>q"},
                                                                  {"from": "gpt", "value": "a"}]},
        "tag_mismatch": {"image": ["img/ok.png", "img/ok.png"], "conversations": ok["conversations"]},
        "tag_in_answer": {"image": "img/ok.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                                   {"from": "gpt", "value": "see <image>"}]},
        "bad_roles": {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        "empty_turn": {"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": "a"}]},
        "bbox_range": {"image": "img/ok.png", "conversations": [
            {"from": "human", "value": "<image>Find it."},
            {"from": "gpt", "value": '[{"bbox_2d": [10, 20, 1500, 600], "label": "square"}]'}]},
        "too_long": {"conversations": [{"from": "human", "value": "word " * 400}, {"from": "gpt", "value": "a"}]},
    }
    (d / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    return d / "data.jsonl", list(rows)


def test_finds_each_kind_of_problem_and_passes_clean_samples(dataset, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    path, names = dataset
    report = check_records(load_mixture(str(path)), str(tiny_model_dir), max_length=300, workers=2, timeout=30)
    by_name = {names[r.index]: [(p.field, p.what) for p in r.problems] for r in report.results}
    for name in names:
        if name.startswith("clean"):
            assert by_name[name] == [], name
        else:
            assert by_name[name], f"{name} not flagged"
    assert "not found" in by_name["missing_file"][0][1]
    assert "cannot decode image" in by_name["corrupt_image"][0][1]
    assert "aspect ratio" in by_name["aspect_ratio"][0][1]
    assert by_name["broken_video"][0][0] == "video[0]"
    assert by_name["tag_mismatch"][0][0] == "image"
    assert "outside 0..1000" in by_name["bbox_range"][0][1]
    assert by_name["too_long"][0][0] == "length"
    s = summarize(report)
    assert s["valid"] == 4 and s["invalid"] == len(names) - 4
    # second run: unchanged clean samples come from the cache, same answer
    again = check_records(load_mixture(str(path)), str(tiny_model_dir), max_length=300, workers=2, timeout=30)
    assert again.cached == 4
    assert [r.length for r in again.results] == [r.length for r in report.results]


def test_a_hanging_decoder_is_timed_out_not_stuck(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    os.mkfifo(tmp_path / "hang.mp4")  # opening a pipe with no writer blocks forever
    write_image(tmp_path / "a.png")
    q = [{"from": "human", "value": "<video>q"}, {"from": "gpt", "value": "a"}]
    rows = [{"video": "hang.mp4", "conversations": q},
            {"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = check_records(load_mixture(str(tmp_path / "d.jsonl")), str(tiny_model_dir), workers=1, timeout=3)
    assert "longer than 3s" in report.results[0].problems[0].what
    assert report.results[1].problems == [] and report.results[1].length


def test_cli_exit_codes_and_output_files(dataset, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    path, names = dataset
    runner = CliRunner()
    valid, problems = path.parent / "valid.jsonl", tmp_path / "problems.jsonl"  # beside the data: relative paths hold
    res = runner.invoke(app, ["data", "check", str(path), "--model", str(tiny_model_dir), "--max-length", "300",
                              "--write-valid", str(valid), "--write-problems", str(problems)])
    assert res.exit_code == 1, res.output
    assert "sample 4" in res.output and "not found" in res.output
    assert len(valid.read_text().splitlines()) == 4
    bad = [json.loads(line) for line in problems.read_text().splitlines()]
    assert len(bad) == len(names) - 4 and all(b["problems"] and "record" in b for b in bad)
    # the valid file checks clean; the input is never overwritten
    res = runner.invoke(app, ["data", "check", str(valid), "--model", str(tiny_model_dir), "--max-length", "300"])
    assert res.exit_code == 0, res.output
    before = path.read_text()
    res = runner.invoke(app, ["data", "check", str(path), "--model", str(tiny_model_dir), "--write-valid", str(path)])
    assert res.exit_code == 2 and "is the input file" in res.output
    assert path.read_text() == before
