"""The synthetic shapes dataset: determinism, format validity, boxes that match the pixels, decodable videos."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from qvl.data import synth
from qvl.data.grounding import SCALE, parse_grounding, to_pixels, to_qwen3
from qvl.errors import QvlError

N, VAL, VIDEOS, SEED = 80, 0.25, 3, 7


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> tuple[Path, synth.ShapesSummary]:
    out = tmp_path_factory.mktemp("synth") / "shapes"
    return out, synth.make_shapes(out, n=N, val_fraction=VAL, n_videos=VIDEOS, seed=SEED)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout_and_summary(shapes):
    out, summary = shapes
    train, val, videos = _rows(out / "train.jsonl"), _rows(out / "val.jsonl"), _rows(out / "videos.jsonl")
    assert (len(train), len(val)) == (N - round(N * VAL), round(N * VAL))
    assert len(list((out / "images").iterdir())) == N
    assert len(list((out / "videos").glob("*.mp4"))) == VIDEOS and len(videos) == 2 * VIDEOS
    assert sum(summary.counts["train"].values()) == len(train)
    assert set(summary.counts["train"]) == set(synth.QUESTION_WEIGHTS)  # every question type occurs
    text = str(summary)
    assert "train" in text and "val" in text and "videos" in text and str(out) in text and " s" in text


def test_registry_paths_relative_to_yaml(shapes):
    out, _ = shapes
    reg = yaml.safe_load((out / "datasets.yaml").read_text())
    assert set(reg) == {"shapes_train", "shapes_val", "shapes_video"}
    for entry in reg.values():
        base = out / entry["data_path"]
        ann = out / entry["annotation_path"]
        assert ann.is_file()
        for row in _rows(ann):
            assert (base / row.get("image", row.get("video"))).is_file()


def test_official_format(shapes):
    out, _ = shapes
    for name, media, tag in (("train.jsonl", "image", "<image>"), ("val.jsonl", "image", "<image>"),
                             ("videos.jsonl", "video", "<video>")):
        for row in _rows(out / name):
            assert set(row) == {media, "conversations"} and not Path(row[media]).is_absolute()
            turns = row["conversations"]
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) in (2, 4)
            assert sum(t["value"].count(tag) for t in turns if t["from"] == "human") == 1
            assert turns[0]["value"].startswith(tag + "\n")
            assert not any("<image>" in t["value"] or "<video>" in t["value"] for t in turns if t["from"] == "gpt")
            assert all(t["value"].strip() for t in turns)


def test_answers_match_the_drawn_pixels(shapes):
    """Every bbox_2d is within 0–1000 and, mapped back to pixels, bounds exactly the shape's coloured pixels."""
    out, _ = shapes
    rows = _rows(out / "train.jsonl") + _rows(out / "val.jsonl")
    checked = 0
    for row in rows:
        image = np.asarray(Image.open(out / row["image"]).convert("RGB")).astype(int)
        h, w = image.shape[:2]
        for turn in row["conversations"][1::2]:
            for item in parse_grounding(turn["value"]):
                box = item["bbox_2d"]
                assert all(0 <= v <= SCALE for v in box) and box[0] < box[2] and box[1] < box[3]
                colour, kind = item["label"].split()
                assert kind in synth.SHAPES
                x1, y1, x2, y2 = (round(v) for v in to_pixels(box, w, h))
                # Pixels of the labelled colour in a window a few px larger than the box.
                win = image[max(0, y1 - 4):y2 + 4, max(0, x1 - 4):x2 + 4]
                close = np.abs(win - np.array(synth.COLOURS[colour])).sum(axis=2) < 45
                ys, xs = np.nonzero(close)
                found = [xs.min() + max(0, x1 - 4), ys.min() + max(0, y1 - 4),
                         xs.max() + 1 + max(0, x1 - 4), ys.max() + 1 + max(0, y1 - 4)]
                assert all(abs(a - b) <= 2 for a, b in zip(found, (x1, y1, x2, y2))), (row["image"], item, found)
                checked += 1
    assert checked > 20


def test_answers_agree_with_scene(shapes):
    out, _ = shapes
    for i, row in enumerate(_rows(out / "train.jsonl")[:30]):
        scene, _, rounds = synth.make_image_sample(SEED, i)
        w, h = scene.image.size
        for question, answer in rounds:
            if question.startswith("Locate every"):
                target = question.split()[2]
                expected = sorted(to_qwen3(s.box, w, h) for s in scene.shapes if target in ("shape", s.kind))
                assert sorted(item["bbox_2d"] for item in parse_grounding(answer)) == expected
            elif question.startswith("What colour is the "):
                kind = question.removeprefix("What colour is the ").rstrip("?")
                assert [s.colour for s in scene.shapes if s.kind == kind] == [answer]
            elif question == "How many shapes are there in the image?":
                assert answer == str(len(scene.shapes))
        assert row["conversations"][1]["value"] == rounds[0][1]


def test_videos_decode_with_written_frames_and_fps(shapes):
    out, _ = shapes
    rows = _rows(out / "videos.jsonl")
    directions = {r["conversations"][1]["value"] for r in rows if "Which way" in r["conversations"][0]["value"]}
    assert directions == set(synth.DIRECTIONS[:VIDEOS])
    for j in range(VIDEOS):
        spec = synth.video_spec(SEED, j)
        with av.open(str(out / f"videos/v{j}.mp4")) as container:
            stream = container.streams.video[0]
            frames = list(container.decode(stream))
            assert float(stream.average_rate) == spec.fps == 8
            assert len(frames) == spec.frames and 16 <= spec.frames <= 32
            assert [round(f.time * spec.fps) for f in frames] == list(range(spec.frames))
            assert (frames[0].width, frames[0].height) == (spec.width, spec.height)
            assert 96 <= spec.width <= 160 and 96 <= spec.height <= 160
            # The shape really moves the stated way: its colour centroid shifts along that axis.
            first, last = (_centroid(f.to_ndarray(format="rgb24"), spec.colour) for f in (frames[0], frames[-1]))
            dx, dy = last[0] - first[0], last[1] - first[1]
            moved = {"left": -dx, "right": dx, "up": -dy, "down": dy}[spec.direction]
            assert moved > min(spec.width, spec.height) / 3


def _centroid(rgb: np.ndarray, colour: str) -> tuple[float, float]:
    ys, xs = np.nonzero(np.abs(rgb.astype(int) - np.array(synth.COLOURS[colour])).sum(axis=2) < 45)
    return xs.mean(), ys.mean()


def test_deterministic(tmp_path):
    a = synth.make_shapes(tmp_path / "a", n=12, val_fraction=0.25, n_videos=2, seed=3)
    synth.make_shapes(tmp_path / "b", n=12, val_fraction=0.25, n_videos=2, seed=3)
    synth.make_shapes(tmp_path / "c", n=12, val_fraction=0.25, n_videos=2, seed=4)
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb  # jsonl, images and videos byte-identical
    assert fa["train.jsonl"] != fc["train.jsonl"] and fa["images/00000.jpg"] != fc["images/00000.jpg"]
    assert a.codec in ("libx264", "h264", "mpeg4")


def test_refuses_non_empty_out_and_bad_args(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(QvlError, match="not empty"):
        synth.make_shapes(tmp_path / "x", n=2, n_videos=0)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    for kwargs in ({"n": 0}, {"val_fraction": 1.0}, {"n_videos": -1}):
        with pytest.raises(QvlError):
            synth.make_shapes(tmp_path / "y", **{"n": 2, **kwargs})
    assert not (tmp_path / "y").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["x"]  # no temporary folders left behind


def test_cli_synth_shapes(tmp_path):
    from qvl.cli.main import app

    out = tmp_path / "cli"
    runner = CliRunner()
    args = ["data", "synth", "shapes", "--out", str(out), "--n", "10", "--val-fraction", "0.2", "--videos", "1",
            "--seed", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train" in result.output and len(_rows(out / "val.jsonl")) == 2
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "not empty" in again.output


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_write_mp4_each_codec(tmp_path, codec):
    """The H.264 choice and the MPEG-4 fallback both keep frame count, fps and size."""
    try:
        av.codec.Codec(codec, "w")
    except Exception:  # noqa: BLE001
        pytest.skip(f"{codec} not in this PyAV build")
    spec, frames = synth.render_video(0, 1)
    synth.write_mp4(tmp_path / "v.mp4", frames, spec.fps, codec)
    assert synth.probe_mp4(tmp_path / "v.mp4") == (spec.frames, float(spec.fps), spec.width, spec.height)
    # Byte-identical on every run (libx264 with B-frames was not: about 1 run in 4 differed).
    first = (tmp_path / "v.mp4").read_bytes()
    for k in range(12):
        synth.write_mp4(tmp_path / f"v{k}.mp4", frames, spec.fps, codec)
        assert (tmp_path / f"v{k}.mp4").read_bytes() == first
