"""`qvl demo` end to end on a shortened run (a few images, a few steps): wiring, table, rerun in place."""

import json

import pytest

from qvl.demo import MARKER, make_demo_data, run_demo
from qvl.errors import QvlError


def test_demo_data_is_deterministic_balanced_and_reused(tmp_path):
    make_demo_data(tmp_path / "a", n_train=12, n_val=6)
    make_demo_data(tmp_path / "b", n_train=12, n_val=6)
    for name in ("train.jsonl", "val.jsonl", "images/val00003.jpg"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    val = [json.loads(x) for x in (tmp_path / "a" / "val.jsonl").read_text().splitlines()]
    assert len(val) == 12  # both questions for every held-out image
    shapes = [r["conversations"][1]["value"] for r in val if "What shape" in r["conversations"][0]["value"]]
    assert sorted(shapes) == ["circle", "circle", "square", "square", "triangle", "triangle"]
    assert make_demo_data(tmp_path / "a", n_train=12, n_val=6)["reused"]
    assert not make_demo_data(tmp_path / "a", n_train=12, n_val=3)["reused"]  # other settings: rebuilt


def test_demo_runs_end_to_end_and_again(tmp_path, capsys):
    out = tmp_path / "demo_out"
    short = {"per_device_train_batch_size": 4, "logging_steps": 1, "report_to": "none"}
    r = run_demo(out, n_train=8, n_val=3, steps=2, overrides=short)
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "Qwen/Qwen3-VL-2B-Instruct" in text
    assert f"qvl serve --model {out / 'run'}" in text
    assert "tiny, random init (base)" in text and "tiny, fine-tuned" in text and "chance" in text
    assert r["steps"] == 2 and (out / "run" / "config.json").is_file()
    for key in ("before", "after"):
        s = r[key]
        assert s["colour_n"] == 3 and s["shape_n"] == 3 and 0 <= s["closed"] <= 1 and 0 <= s["greedy"] <= 1
    # again, in place: model and data reused, the previous run replaced (not piled up)
    r2 = run_demo(out, n_train=8, n_val=3, steps=2, overrides=short)
    text = capsys.readouterr().out
    assert "(reused)" in text and r2["before"] == r["before"] and r2["after"] == r["after"]
    assert not (out / "run" / "previous").exists()


def test_demo_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user file")
    with pytest.raises(QvlError, match="not made by `qvl demo`"):
        run_demo(tmp_path, n_train=2, n_val=1, steps=1)
    assert (tmp_path / "mine.txt").read_text() == "user file" and not (tmp_path / MARKER).exists()
    with pytest.raises(QvlError, match="is a file"):  # was NotADirectoryError
        run_demo(tmp_path / "mine.txt", n_train=2, n_val=1, steps=1)
    assert (tmp_path / "mine.txt").read_text() == "user file"
