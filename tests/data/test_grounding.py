"""Box math, answer parsing and detection-dataset conversion (qvl.data.grounding, `qvl data bbox`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from qvl.data import grounding as g
from qvl.errors import QvlError

# The official notebook's example (tools/process_bbox.ipynb): COCO demo image, "bowl of carrots".
W, H = 640, 428
BOX = [146, 137, 615, 415]
QWEN3 = [228, 320, 961, 970]
QWEN25 = [147, 134, 619, 407]


# --- coordinate math -----------------------------------------------------------------------------

def test_notebook_example():
    assert g.to_qwen3(BOX, W, H) == QWEN3
    assert g.smart_resize(H, W) == (420, 644)
    assert g.to_qwen25(BOX, W, H) == QWEN25
    # Re-quantising the legacy box lands within one unit of converting the original directly.
    assert all(abs(a - b) <= 1 for a, b in zip(g.qwen25_to_qwen3(QWEN25, W, H), QWEN3))


@pytest.mark.parametrize("h,w", [(10, 10), (428, 640), (4000, 6000), (28, 5000), (1080, 1920)])
def test_smart_resize_bounds(h, w):
    nh, nw = g.smart_resize(h, w)
    assert nh % 28 == 0 and nw % 28 == 0
    assert g.QWEN25_MIN_PIXELS <= nh * nw <= g.QWEN25_MAX_PIXELS
    assert g.smart_resize(h, w, factor=32, min_pixels=0, max_pixels=10**9)[0] % 32 == 0


def test_smart_resize_rejects_extreme_aspect():
    with pytest.raises(QvlError):
        g.smart_resize(10, 3000)


def test_xywh_round_trip_and_points():
    xywh = [146, 137, 469, 278]
    assert g.xywh_to_xyxy(xywh) == BOX
    assert g.xyxy_to_xywh(g.xywh_to_xyxy(xywh)) == xywh
    assert g.to_qwen3([320, 214], W, H) == [500, 500]
    assert g.to_pixels([500, 500], W, H) == [320, 214]
    assert g.to_qwen3([-5, 0, 700, 500], W, H) == [0, 0, 1000, 1000]


def test_to_pixels_inverts_to_qwen3():
    for box in ([0, 0, W, H], BOX, [1.5, 2.5, 3.5, 4.5]):
        back = g.to_pixels(g.to_qwen3(box, W, H), W, H)
        assert all(abs(a - b) <= max(W, H) / 1000 for a, b in zip(back, box))


def test_clean_coords_reports():
    box, problems = g.clean_coords([700, 500, -3, 1], W, H)
    assert box == [0, 1, 640, 428]
    assert any("swapped" in p for p in problems) and any("clamped" in p for p in problems)
    assert g.clean_coords([10, 10, 10, 50], W, H)[0] is None
    assert g.clean_coords([700, 0, 800, 10], W, H)[0] is None  # entirely right of the image
    assert g.clean_coords(["a", 1, 2, 3], W, H)[0] is None
    assert g.clean_coords(BOX, W, H) == (BOX, [])
    q, problems = g.convert_coords([100, 10, 100.2, 50], 4000, 3000)  # 0.2 px of 4000: collapses on 0..1000
    assert q is None and "under 1/1000" in problems[-1]


def test_drawn_box_round_trip():
    """A rectangle drawn from a 0–1000 answer covers the pixels of the original box."""
    img = Image.new("L", (W, H), 0)
    ImageDraw.Draw(img).rectangle(g.to_pixels(QWEN3, W, H), fill=255)
    x1, y1, x2, y2 = img.getbbox()
    assert all(abs(a - b) <= 1 for a, b in zip((x1, y1, x2, y2), BOX))


# --- parsing model answers -------------------------------------------------------------------------

def test_parse_fenced_list_with_text():
    text = 'Here you go:\n```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"point_2d": [5, 6], "label": "dog"}]\n```\nDone [1, 2].'
    assert g.parse_grounding(text) == [{"bbox_2d": [1, 2, 3, 4], "label": "cat"}, {"point_2d": [5, 6], "label": "dog"}]


def test_parse_bare_dict_and_floats():
    assert g.parse_grounding('{"bbox_2d": [1.0, 2.5, "3", 4], "label": "x"} trailing') == [
        {"bbox_2d": [1, 2.5, 3, 4], "label": "x"}]


def test_parse_truncated_and_nested():
    assert g.parse_grounding('[{"bbox_2d": [1, 2, 3, 4], "label": "a"}, {"bbox_2d": [5, 6') == [
        {"bbox_2d": [1, 2, 3, 4], "label": "a"}]
    assert g.parse_grounding('{"objects": [{"bbox_2d": [1, 2, 3, 4]}]}') == [{"bbox_2d": [1, 2, 3, 4], "label": ""}]


@pytest.mark.parametrize("text", ["", "no boxes here", "[1, 2, 3]", '{"bbox_2d": [1, 2, 3]}', '{"bbox_2d": "x"}',
                                  "```json\n[{bad json}]\n```", '{"point_2d": [true, 1]}', None])
def test_parse_garbage(text):
    assert g.parse_grounding(text) == []


def test_parse_qwen2_box_tokens():
    text = "<|object_ref_start|>a dog<|object_ref_end|><|box_start|>(10,20),(300,400)<|box_end|>"
    assert g.parse_grounding(text) == [{"bbox_2d": [10, 20, 300, 400], "label": "a dog"}]


def test_format_answer_round_trip():
    items = [{"bbox_2d": QWEN3, "label": "bowl of carrots"}]
    for fence in (False, True):
        assert g.parse_grounding(g.format_answer(items, fence)) == items
    assert g.format_answer(items) == '[{"bbox_2d": [228, 320, 961, 970], "label": "bowl of carrots"}]'


# --- dataset conversion ---------------------------------------------------------------------------

def _image(folder: Path, name: str, size=(W, H)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "gray").save(folder / name)


def _answer(sample: dict) -> list[dict]:
    return json.loads(sample["conversations"][1]["value"])


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "images"
    _image(images, "a.jpg")
    _image(images, "b.jpg", (100, 50))
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": W, "height": H},
                   {"id": 2, "file_name": "b.jpg", "width": 100, "height": 50},
                   {"id": 3, "file_name": "missing.jpg", "width": 10, "height": 10}],
        "categories": [{"id": 7, "name": "bowl of carrots"}, {"id": 8, "name": "cup"}],
        "annotations": [
            {"id": 11, "image_id": 1, "category_id": 7, "bbox": [146, 137, 469, 278], "iscrowd": 0},
            {"id": 12, "image_id": 1, "category_id": 8, "bbox": [600, 400, 100, 100], "iscrowd": 0},  # clamped
            {"id": 13, "image_id": 1, "category_id": 8, "bbox": [0, 0, 64, 0], "iscrowd": 0},  # no area
            {"id": 14, "image_id": 1, "category_id": 8, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd: skipped
            {"id": 21, "image_id": 2, "category_id": 8, "bbox": [0, 0, 50, 25], "iscrowd": 0},
            {"id": 31, "image_id": 3, "category_id": 8, "bbox": [0, 0, 5, 5], "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, images


def test_coco_per_label(coco):
    path, images = coco
    samples, report = g.convert("coco", path, images)
    assert [s["image"] for s in samples] == ["a.jpg", "a.jpg", "b.jpg"]
    first = samples[0]
    assert first["conversations"][0]["value"] == (
        "<image>\nLocate every bowl of carrots in the image and output bbox coordinates in JSON format.")
    assert _answer(first) == [{"bbox_2d": QWEN3, "label": "bowl of carrots"}]
    assert _answer(samples[1]) == [{"bbox_2d": [938, 935, 1000, 1000], "label": "cup"}]
    assert _answer(samples[2]) == [{"bbox_2d": [0, 0, 500, 500], "label": "cup"}]
    assert (report.images, report.samples, report.clamped, report.dropped, report.skipped_images) == (3, 3, 1, 1, 1)
    text = "\n".join(report.messages)
    assert "annotation id 12" in text and "annotation id 13" in text and "missing.jpg" in text
    assert "annotation id 14" not in text


def test_coco_all_mode_and_templates(coco):
    path, images = coco
    t = g.Templates(all="Find: {labels}.")
    samples, _ = g.convert("coco", path, images, templates=t, mode="all", fence=True)
    assert len(samples) == 2
    assert samples[0]["conversations"][0]["value"] == "<image>\nFind: bowl of carrots, cup."
    assert samples[0]["conversations"][1]["value"].startswith("```json\n")
    assert [i["label"] for i in g.parse_grounding(samples[0]["conversations"][1]["value"])] == ["bowl of carrots", "cup"]


def test_voc_one_based(tmp_path):
    xml_dir = tmp_path / "Annotations"
    xml_dir.mkdir()
    (xml_dir / "a.xml").write_text(f"""<annotation><filename>a.jpg</filename>
      <size><width>{W}</width><height>{H}</height><depth>3</depth></size>
      <object><name>bowl of carrots</name><difficult>0</difficult>
        <bndbox><xmin>147</xmin><ymin>138</ymin><xmax>615</xmax><ymax>415</ymax></bndbox></object>
      <object><name>cup</name><bndbox><xmin>630</xmin><ymin>10</ymin><xmax>700</xmax><ymax>20</ymax></bndbox></object>
    </annotation>""")
    samples, report = g.convert("voc", xml_dir)
    assert _answer(samples[0]) == [{"bbox_2d": QWEN3, "label": "bowl of carrots"}]
    assert report.clamped == 1 and "a.xml object 1 ('cup')" in report.messages[0]
    assert g.read_voc(xml_dir / "a.xml", one_based=False)[0].objects[0].box == [147, 138, 615, 415]


def test_xyxy_jsonl_with_points_and_sizes_from_images(tmp_path):
    images = tmp_path / "imgs"
    _image(images, "a.png")
    path = tmp_path / "boxes.jsonl"
    rows = [{"image": "a.png", "objects": [{"bbox": BOX, "label": "bowl"}, {"point": [320, 214], "label": "bowl"},
                                            {"label": "nothing"}]},
            {"image": "gone.png", "width": 10, "height": 10, "boxes": [{"bbox_2d": [0, 0, 1, 1], "label": "x"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples, report = g.convert("jsonl", path, images)
    assert len(samples) == 2
    assert _answer(samples[0]) == [{"bbox_2d": QWEN3, "label": "bowl"}]
    assert _answer(samples[1]) == [{"point_2d": [500, 500], "label": "bowl"}]
    assert "Point to every bowl" in samples[1]["conversations"][0]["value"]
    assert report.dropped == 1 and report.skipped_images == 1
    assert any("boxes.jsonl line 1 object 2" in m for m in report.messages)
    assert any("gone.png" in m for m in report.messages)


def test_qwen25_requantise(tmp_path):
    images = tmp_path / "imgs"
    _image(images, "a.jpg")
    answer = f'The bowl:\n```json\n[{{"bbox_2d": {QWEN25}, "label": "bowl"}}, {{"point_2d": [322, 210]}}]\n```\nok'
    rows = [{"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\nFind the bowl."},
                                                  {"from": "gpt", "value": answer}]},
            {"image": ["a.jpg", "a.jpg"], "conversations": []},
            {"image": "a.jpg", "width": W, "height": H, "conversations": [
                {"from": "human", "value": "<image>\nx"}, {"from": "gpt", "value": '{"bbox_2d": [600, 10, 700, 20]}'}]}]
    path = tmp_path / "legacy.json"
    path.write_text(json.dumps(rows))
    samples, report = g.convert("qwen25", path, images)
    assert len(samples) == 2 and report.skipped_images == 1
    value = samples[0]["conversations"][1]["value"]
    assert value.startswith("The bowl:\n```json\n") and value.endswith("\n```\nok")
    items = g.parse_grounding(value)
    assert items[0] == {"bbox_2d": [228, 319, 961, 969], "label": "bowl"}
    assert items[1]["point_2d"] == [500, 500]
    assert samples[0]["conversations"][0]["value"] == "<image>\nFind the bowl."
    assert report.clamped == 1 and "resized image" in report.messages[-1]
    assert g.parse_grounding(samples[1]["conversations"][1]["value"])[0]["bbox_2d"] == [932, 24, 1000, 48]


def test_unknown_format(tmp_path):
    with pytest.raises(QvlError):
        g.convert("yolo", tmp_path / "x")
    with pytest.raises(QvlError):
        g.convert("coco", tmp_path / "missing.json")


# --- CLI -----------------------------------------------------------------------------------------

def _bbox_app() -> typer.Typer:
    """`qvl data` if bbox is already wired into it, else a fresh app holding just the command."""
    from qvl.cli.main import app  # first: importing data_cmd before main is circular

    from qvl.cli import data_cmd

    if any(c.name == "bbox" for c in data_cmd.app.registered_commands):
        return app
    from qvl.cli.bbox_cmd import register

    data = typer.Typer()
    data.callback()(lambda: None)
    register(data)
    outer = typer.Typer()
    outer.add_typer(data, name="data")
    return outer


def test_cli_bbox(coco, tmp_path):
    path, images = coco
    app, runner, out = _bbox_app(), CliRunner(), tmp_path / "out" / "ground.jsonl"
    args = ["data", "bbox", "--from", "coco", str(path), "--images", str(images), "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 samples" in result.output and "annotation id 12" in result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert _answer(rows[0])[0]["bbox_2d"] == QWEN3
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "exists" in again.output
    same = runner.invoke(app, ["data", "bbox", "--from", "coco", str(path), "--out", str(path), "--overwrite"])
    assert same.exit_code == 2 and "input" in same.output
    assert json.loads(path.read_text())["images"]  # input untouched
