"""Grounding boxes and points: the one place for coordinate math, answer parsing and dataset conversion.

Qwen3-VL reads and writes boxes as **relative integers on a 0–1000 scale** (the Qwen2-VL convention:
``round(x / width * 1000)``), so a box does not depend on how the processor resizes the image.
Qwen2.5-VL used absolute pixels of the *smart-resized* image (factor 28) instead; data made for it must
be re-quantised with the image size those pixels referred to (QwenLM/Qwen3-VL#1623). Everything that
touches a box — the synthetic dataset, ``qvl data bbox``, ``qvl data check``, eval and the web UI — goes
through these functions, so the conventions cannot drift apart.

Conventions used throughout:

* Pixel coordinates are continuous: pixel column ``i`` covers ``[i, i + 1)``, so a box around the
  whole of a ``w × h`` image is ``[0, 0, w, h]``.
* Argument order is ``(coords, w, h)``: width before height. The one exception is
  :func:`smart_resize`, which keeps Qwen's own ``(height, width)`` order.
* ``coords`` is a box ``[x1, y1, x2, y2]`` or a point ``[x, y]``: the converters handle both.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl.errors import QvlError

SCALE = 1000
"""Qwen3-VL's relative coordinate range: integers 0..1000."""

# Qwen2.5-VL's image processor defaults, used by its absolute-coordinate grounding data.
QWEN25_FACTOR = 28
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 14 * 14 * 4 * 1280


# --------------------------------------------------------------------------------------------------
# Coordinate math
# --------------------------------------------------------------------------------------------------

def _check_coords(coords) -> list[float]:
    values = list(coords)
    if len(values) not in (2, 4):
        raise QvlError(f"expected a box [x1, y1, x2, y2] or a point [x, y], got {values!r}")
    return [float(v) for v in values]


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def xywh_to_xyxy(box) -> list[float]:
    """COCO ``[x, y, width, height]`` → ``[x1, y1, x2, y2]``."""
    x, y, w, h = _check_coords(box)
    return [x, y, x + w, y + h]


def xyxy_to_xywh(box) -> list[float]:
    """``[x1, y1, x2, y2]`` → COCO ``[x, y, width, height]``."""
    x1, y1, x2, y2 = _check_coords(box)
    return [x1, y1, x2 - x1, y2 - y1]


def to_qwen3(coords, w: float, h: float) -> list[int]:
    """Pixel box or point → Qwen3-VL 0–1000 integers: ``round(x / w * 1000)``, clamped to [0, 1000].

    This is the official notebook's ``convert_to_qwen2vl_format`` (Qwen3-VL uses the same scale), so
    640×428 with ``[146, 137, 615, 415]`` gives ``[228, 320, 961, 970]``. It never fails on an
    out-of-image box; use :func:`clean_coords` first when the problem must be reported.
    """
    values = _check_coords(coords)
    sizes = (w, h)
    return [int(_clamp(round(v / sizes[i % 2] * SCALE), 0, SCALE)) for i, v in enumerate(values)]


def to_pixels(coords, w: float, h: float) -> list[float]:
    """Qwen3-VL 0–1000 box or point → pixel coordinates of a ``w × h`` image, for drawing and scoring."""
    values = _check_coords(coords)
    sizes = (w, h)
    return [v / SCALE * sizes[i % 2] for i, v in enumerate(values)]


def smart_resize(height: int, width: int, *, factor: int = QWEN25_FACTOR, min_pixels: int = QWEN25_MIN_PIXELS,
                 max_pixels: int = QWEN25_MAX_PIXELS) -> tuple[int, int]:
    """The size (height, width) the Qwen2/2.5-VL processor resizes an image to.

    Both sides become multiples of ``factor`` and the area lands in ``[min_pixels, max_pixels]``,
    keeping the aspect ratio as well as rounding allows. Defaults are Qwen2.5-VL's (factor 28), which
    is what legacy absolute-coordinate grounding data refers to; pass the values used to make the data
    if they differed.
    """
    if height <= 0 or width <= 0:
        raise QvlError(f"image size {width}x{height} is not positive")
    if max(height, width) / min(height, width) > 200:
        raise QvlError(f"image {width}x{height} has an aspect ratio over 200", fix="crop or pad the image")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_qwen25(coords, w: int, h: int, **resize) -> list[int]:
    """Pixel box or point → Qwen2.5-VL absolute pixels on the smart-resized image (clamped to W−1/H−1).

    The official notebook's ``convert_to_qwen25vl_format``; kept to make and test legacy data.
    """
    new_h, new_w = smart_resize(h, w, **resize)
    limits = (new_w - 1, new_h - 1)
    scales = (new_w / w, new_h / h)
    return [int(_clamp(round(v * scales[i % 2]), 0, limits[i % 2])) for i, v in enumerate(_check_coords(coords))]


def qwen25_to_qwen3(coords, w: int, h: int, **resize) -> list[int]:
    """Re-quantise a legacy Qwen2.5-VL box/point (pixels of the smart-resized ``w × h`` image) to 0–1000.

    ``w``/``h`` are the *original* image size; the resized size is recomputed with :func:`smart_resize`.
    """
    new_h, new_w = smart_resize(h, w, **resize)
    return to_qwen3(coords, new_w, new_h)


def clean_coords(coords, w: float, h: float) -> tuple[list[float] | None, list[str]]:
    """Repair a pixel box or point so it can be converted, saying what was wrong.

    Reversed corners are swapped, anything outside the image is clamped to it, and a box with no area
    left (or non-numeric values) is rejected with ``None``. Returns ``(coords or None, problems)``.
    """
    try:
        values = _check_coords(coords)
    except (QvlError, TypeError, ValueError):
        return None, [f"not a box or point: {coords!r}"]
    if not all(math.isfinite(v) for v in values):
        return None, [f"non-finite coordinates {values}"]
    problems = []
    if len(values) == 4:
        x1, y1, x2, y2 = values
        if x1 > x2 or y1 > y2:
            values = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
            problems.append(f"corners reversed in {_fmt(coords)}; swapped")
    sizes = (w, h)
    clamped = [_clamp(v, 0.0, float(sizes[i % 2])) for i, v in enumerate(values)]
    if clamped != values:
        problems.append(f"{_fmt(values)} is outside the {_fmt([w])}x{_fmt([h])} image; clamped to {_fmt(clamped)}")
    if len(clamped) == 4 and (clamped[2] <= clamped[0] or clamped[3] <= clamped[1]):
        return None, problems + [f"box {_fmt(clamped)} has no area; dropped"]
    return clamped, problems


def convert_coords(coords, w: float, h: float) -> tuple[list[int] | None, list[str]]:
    """Checked pixel → 0–1000 conversion: :func:`clean_coords`, then :func:`to_qwen3`.

    A box narrower than one unit of the 0–1000 grid collapses after rounding; it is dropped and
    reported rather than written as a zero-area answer.
    """
    cleaned, problems = clean_coords(coords, w, h)
    if cleaned is None:
        return None, problems
    q = to_qwen3(cleaned, w, h)
    if len(q) == 4 and (q[2] <= q[0] or q[3] <= q[1]):
        return None, problems + [f"box {_fmt(cleaned)} is under 1/1000 of the image on a side; dropped"]
    return q, problems


def _fmt(values) -> str:
    text = ", ".join(f"{v:g}" for v in map(float, values))
    return f"[{text}]" if len(values) > 1 else text


# --------------------------------------------------------------------------------------------------
# Answers: writing and parsing
# --------------------------------------------------------------------------------------------------

BOX_KEY, POINT_KEY = "bbox_2d", "point_2d"

_BOX_TOKENS = re.compile(
    r"(?:<\|object_ref_start\|>(?P<label>.*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>\s*\((?P<x1>[\d.]+),\s*(?P<y1>[\d.]+)\)\s*,\s*\((?P<x2>[\d.]+),\s*(?P<y2>[\d.]+)\)\s*<\|box_end\|>",
    re.S,
)


def format_answer(items: list[dict], fence: bool = False) -> str:
    """Serialise ``[{"bbox_2d": [...], "label": ...}]`` the way Qwen3-VL answers (optionally in a json fence)."""
    text = json.dumps(items, ensure_ascii=False)
    return f"```json\n{text}\n```" if fence else text


def _json_spans(text: str) -> Iterator[tuple[int, int, Any]]:
    """Every outermost JSON array/object in ``text`` as ``(start, end, value)``, left to right.

    A value that fails to parse (e.g. a list cut off by the generation limit) is skipped one
    character at a time, so the complete objects inside it are still found.
    """
    decoder = json.JSONDecoder()
    opener = re.compile(r"[\[{]")
    pos = 0
    while (m := opener.search(text, pos)) is not None:
        try:
            value, end = decoder.raw_decode(text, m.start())
        except json.JSONDecodeError:
            pos = m.start() + 1
            continue
        yield m.start(), end, value
        pos = end


def _number_list(value, n: int) -> list[int | float] | None:
    if not isinstance(value, (list, tuple)) or len(value) != n:
        return None
    out = []
    for v in value:
        if isinstance(v, bool):
            return None
        try:
            f = float(v)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        out.append(int(f) if f.is_integer() else f)
    return out


def _grounding_items(value) -> Iterator[dict]:
    """Walk parsed JSON and yield every dict that holds a valid bbox_2d or point_2d."""
    if isinstance(value, dict):
        if BOX_KEY in value or POINT_KEY in value:
            key, n = (BOX_KEY, 4) if BOX_KEY in value else (POINT_KEY, 2)
            coords = _number_list(value[key], n)
            if coords is not None:
                item = dict(value)
                item[key] = coords
                item["label"] = str(value.get("label", ""))
                yield item
            return
        for v in value.values():
            yield from _grounding_items(v)
    elif isinstance(value, list):
        for v in value:
            yield from _grounding_items(v)


def parse_grounding(text: str) -> list[dict]:
    """Read the boxes and points out of a model answer.

    Accepts a ```json fence or bare JSON, a single dict or a list, with any text before or after,
    and salvages the complete items of a truncated list. Also reads the Qwen2-VL token form
    ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`` (also 0–1000).
    Returns ``[{"bbox_2d": [x1, y1, x2, y2], "label": str, ...}]`` / ``{"point_2d": [x, y], ...}``
    in reading order; anything unreadable is ignored (garbage → ``[]``). Values are not rescaled.
    """
    if not isinstance(text, str):
        return []
    items = [item for _, _, value in _json_spans(text) for item in _grounding_items(value)]
    for m in _BOX_TOKENS.finditer(text):
        coords = _number_list([m["x1"], m["y1"], m["x2"], m["y2"]], 4)
        items.append({BOX_KEY: coords, "label": (m["label"] or "").strip()})
    return items


# --------------------------------------------------------------------------------------------------
# Conversion of detection datasets into qvl samples
# --------------------------------------------------------------------------------------------------

@dataclass
class Templates:
    """Prompts for generated grounding samples. ``{label}`` is one category; ``{labels}`` a comma list."""

    per_label: str = "Locate every {label} in the image and output bbox coordinates in JSON format."
    all: str = ("Locate every instance that belongs to the following categories: '{labels}'. "
                "Report bbox coordinates in JSON format.")
    point: str = "Point to every {label} in the image and output the point coordinates in JSON format."
    point_all: str = ("Point to every instance that belongs to the following categories: '{labels}'. "
                      "Report point coordinates in JSON format.")


@dataclass
class Obj:
    """One annotated object in pixel coordinates: ``box`` xyxy or ``point`` xy. ``where`` names it in reports."""

    label: str
    box: list[float] | None = None
    point: list[float] | None = None
    where: str = ""


@dataclass
class ImageAnn:
    """One image's annotations. ``image`` is relative to the images folder; sizes may be unknown (None)."""

    image: str
    objects: list[Obj]
    width: int | None = None
    height: int | None = None
    where: str = ""


@dataclass
class ConversionReport:
    """What a conversion did, and one message per repaired or dropped box / skipped image."""

    images: int = 0
    objects: int = 0
    samples: int = 0
    clamped: int = 0
    dropped: int = 0
    skipped_images: int = 0
    empty_images: int = 0
    messages: list[str] = field(default_factory=list)

    @property
    def problems(self) -> int:
        return self.clamped + self.dropped + self.skipped_images

    def note(self, where: str, messages: list[str]) -> None:
        self.messages.extend(f"{where}: {m}" for m in messages)

    def __str__(self) -> str:
        lines = [
            f"{self.images} images, {self.objects} objects -> {self.samples} samples",
            f"{self.clamped} boxes repaired (clamped/swapped), {self.dropped} dropped, "
            f"{self.skipped_images} images skipped, {self.empty_images} images without objects",
        ]
        return "\n".join(lines)

    def details(self, limit: int | None = 20) -> str:
        shown = self.messages if limit is None else self.messages[:limit]
        extra = len(self.messages) - len(shown)
        return "\n".join(shown + ([f"... and {extra} more"] if extra > 0 else []))


def _image_size(ann: ImageAnn, images: Path | None) -> tuple[int, int] | str:
    """(w, h) from the annotation, else from the image header; a message when neither is possible."""
    path = images / ann.image if images is not None else None
    if path is not None and not path.is_file():
        return f"image file {path} not found; skipped"
    if ann.width and ann.height:
        return int(ann.width), int(ann.height)
    if path is None:
        return "image size unknown and no images folder given; skipped"
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:  # noqa: BLE001 - any unreadable image is reported, not fatal
        return f"cannot read image {path}: {e}; skipped"


def _answer_items(objects: list[Obj], w: int, h: int, report: ConversionReport) -> list[dict]:
    items = []
    for obj in objects:
        is_box = obj.box is not None
        q, problems = convert_coords(obj.box if is_box else obj.point, w, h)
        if problems:
            report.note(obj.where, problems)
            if q is None:
                report.dropped += 1
            else:
                report.clamped += 1
        if q is not None:
            items.append({(BOX_KEY if is_box else POINT_KEY): q, "label": obj.label})
    return items


def _sample(image: str, prompt: str, items: list[dict], fence: bool) -> dict:
    return {"image": image, "conversations": [
        {"from": "human", "value": f"<image>\n{prompt}"},
        {"from": "gpt", "value": format_answer(items, fence)},
    ]}


def _prompt(templates: Templates, labels: list[str], points: bool, mode: str) -> str:
    if mode == "all":
        return (templates.point_all if points else templates.all).format(labels=", ".join(labels), label=labels[0])
    return (templates.point if points else templates.per_label).format(label=labels[0], labels=labels[0])


def annotations_to_samples(anns: list[ImageAnn], images: Path | None = None, templates: Templates | None = None,
                           mode: str = "per_label", fence: bool = False) -> tuple[list[dict], ConversionReport]:
    """Turn pixel annotations into qvl samples (official format) with 0–1000 answers.

    ``mode="per_label"``: one sample per (image, category), prompt from ``templates.per_label``.
    ``mode="all"``: one sample per image listing every category present, from ``templates.all``.
    Points use the ``point*`` templates. Bad boxes are repaired or dropped and reported; images that
    are missing or unreadable are skipped and reported. Image paths stay relative to ``images``, so
    register the output with ``data_path`` = that folder.
    """
    if mode not in ("per_label", "all"):
        raise QvlError(f"unknown grounding mode {mode!r}", fix="use 'per_label' or 'all'")
    templates = templates or Templates()
    images = Path(images) if images is not None else None
    report, samples = ConversionReport(), []
    for ann in anns:
        report.images += 1
        report.objects += len(ann.objects)
        size = _image_size(ann, images)
        if isinstance(size, str):
            report.skipped_images += 1
            report.note(ann.where or ann.image, [size])
            continue
        w, h = size
        groups: dict[tuple[str, bool], list[Obj]] = {}
        for obj in ann.objects:
            groups.setdefault((obj.label, obj.box is None), []).append(obj)
        if mode == "all":
            for points in (False, True):
                objs = [o for o in ann.objects if (o.box is None) == points]
                items = _answer_items(objs, w, h, report)
                if items:
                    labels = list(dict.fromkeys(i["label"] for i in items))
                    samples.append(_sample(ann.image, _prompt(templates, labels, points, mode), items, fence))
        else:
            for (label, points), objs in groups.items():
                items = _answer_items(objs, w, h, report)
                if items:
                    samples.append(_sample(ann.image, _prompt(templates, [label], points, mode), items, fence))
        if not ann.objects:
            report.empty_images += 1
    report.samples = len(samples)
    return samples, report


# --- readers: each returns ImageAnn lists in pixel xyxy -------------------------------------------------

def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise QvlError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise QvlError(f"not valid JSON: {e}", where=str(path)) from None


def _read_records(path: Path) -> list[tuple[str, dict]]:
    """Records of a .jsonl (one per line) or .json (a list) file, each with a 'file line N' location."""
    path = Path(path)
    if not path.is_file():
        raise QvlError(f"{path} not found")
    if path.suffix != ".jsonl":
        data = _load_json(path)
        if not isinstance(data, list):
            raise QvlError("expected a JSON list of records", where=str(path))
        return [(f"{path.name} record {i}", r) for i, r in enumerate(data)]
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append((f"{path.name} line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise QvlError(f"not valid JSON: {e}", where=f"{path}:{n}") from None
    return records


def read_coco(path: Path, skip_crowd: bool = True) -> list[ImageAnn]:
    """COCO detection JSON (``bbox`` = xywh pixels). Crowd regions are skipped by default (not objects)."""
    data = _load_json(path)
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise QvlError("not a COCO file: needs 'images' and 'annotations'", where=str(path))
    names = {c["id"]: c["name"] for c in data.get("categories", [])}
    by_id: dict = {}
    anns = []
    for im in data["images"]:
        ann = ImageAnn(im["file_name"], [], im.get("width"), im.get("height"), where=f"{Path(path).name} image id {im['id']}")
        by_id[im["id"]] = ann
        anns.append(ann)
    for a in data["annotations"]:
        where = f"{Path(path).name} annotation id {a.get('id')}"
        if skip_crowd and a.get("iscrowd"):
            continue
        img = by_id.get(a.get("image_id"))
        if img is None:
            raise QvlError(f"image_id {a.get('image_id')} is not in 'images'", where=where)
        label = names.get(a.get("category_id"), str(a.get("category_id")))
        img.objects.append(Obj(label, box=xywh_to_xyxy(a["bbox"]), where=f"{where} ({img.image})"))
    return anns


def read_voc(path: Path, one_based: bool = True) -> list[ImageAnn]:
    """Pascal VOC XML: one file, or a folder of ``*.xml`` (sorted).

    VOC pixel indices are 1-based and inclusive, so ``xmin=1, xmax=10`` covers the continuous span
    [0, 10]: ``x1 = xmin - 1``, ``x2 = xmax`` (as detectron2 does). ``one_based=False`` takes them as-is.
    """
    path = Path(path)
    files = sorted(path.glob("*.xml")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise QvlError(f"no VOC XML files at {path}")
    shift = 1.0 if one_based else 0.0
    anns = []
    for f in files:
        try:
            root = ET.parse(f).getroot()
        except ET.ParseError as e:
            raise QvlError(f"not valid XML: {e}", where=str(f)) from None
        size = root.find("size")
        w = int(float(size.findtext("width", "0"))) if size is not None else 0
        h = int(float(size.findtext("height", "0"))) if size is not None else 0
        objects = []
        for k, o in enumerate(root.findall("object")):
            bb = o.find("bndbox")
            label = (o.findtext("name") or "").strip()
            where = f"{f.name} object {k} ('{label}')"
            if bb is None:
                objects.append(Obj(label, box=[0, 0, 0, 0], where=f"{where} has no bndbox"))
                continue
            x1, y1, x2, y2 = (float(bb.findtext(t, "nan")) for t in ("xmin", "ymin", "xmax", "ymax"))
            objects.append(Obj(label, box=[x1 - shift, y1 - shift, x2, y2], where=where))
        anns.append(ImageAnn(root.findtext("filename", f.stem + ".jpg"), objects, w or None, h or None, where=f.name))
    return anns


def _first(d: dict, *keys):
    return next((d[k] for k in keys if k in d), None)


def read_xyxy_jsonl(path: Path) -> list[ImageAnn]:
    """JSONL of absolute pixel boxes, one image per line.

    ``{"image": "a.jpg", "width": 640, "height": 428,
    "objects": [{"bbox": [x1, y1, x2, y2], "label": "cat"}, {"point": [x, y], "label": "dog"}]}``.
    ``width``/``height`` are optional (read from the image); ``boxes`` may stand for ``objects`` and
    ``bbox_2d``/``point_2d`` for ``bbox``/``point``.
    """
    anns = []
    for where, rec in _read_records(path):
        image = rec.get("image") if isinstance(rec, dict) else None
        if not isinstance(image, str):
            raise QvlError("each line needs an 'image' path", where=where)
        objects = []
        for k, o in enumerate(_first(rec, "objects", "boxes") or []):
            label, owhere = str(o.get("label", "")), f"{where} object {k}"
            box, point = _first(o, "bbox", "bbox_2d", "box"), _first(o, "point", "point_2d")
            if box is None and point is None:
                box = [0, 0, 0, 0]
                owhere += " has neither bbox nor point"
            objects.append(Obj(label, box=box, point=point if box is None else None, where=owhere))
        anns.append(ImageAnn(image, objects, rec.get("width"), rec.get("height"), where=where))
    return anns


# --- legacy Qwen2.5-VL data -------------------------------------------------------------------------

def _requantise_value(value, w: int, h: int, resize: dict, problems: list[str]):
    """Copy of parsed JSON with every bbox_2d / point_2d moved from Qwen2.5 pixels to 0–1000."""
    if isinstance(value, list):
        return [_requantise_value(v, w, h, resize, problems) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _requantise_value(v, w, h, resize, problems) for k, v in value.items()}
    for key, n in ((BOX_KEY, 4), (POINT_KEY, 2)):
        if key in value:
            coords = _number_list(value[key], n)
            if coords is None:
                problems.append(f"{key} {value[key]!r} is not {n} numbers; left as is")
                continue
            new_h, new_w = smart_resize(h, w, **resize)
            cleaned, issues = clean_coords(coords, new_w, new_h)
            if issues:  # one message per box, so the report counts boxes
                problems.append(f"{'; '.join(issues)} (on the {new_w}x{new_h} resized image)")
            out[key] = to_qwen3(cleaned, new_w, new_h) if cleaned is not None else None
            if cleaned is None:
                out["_dropped"] = True
    return out


def _drop_marked(value):
    if isinstance(value, list):
        return [_drop_marked(v) for v in value if not (isinstance(v, dict) and v.get("_dropped"))]
    if isinstance(value, dict):
        return {k: _drop_marked(v) for k, v in value.items() if k != "_dropped"}
    return value


def requantise_text(text: str, w: int, h: int, **resize) -> tuple[str, int, list[str]]:
    """Rewrite the grounding JSON inside ``text`` from Qwen2.5-VL pixels to Qwen3-VL 0–1000.

    Only JSON holding ``bbox_2d``/``point_2d`` is touched; surrounding prose and fences stay.
    Returns ``(new_text, items_converted, problems)``.
    """
    pieces, pos, count, problems = [], 0, 0, []
    for start, end, value in _json_spans(text):
        n = sum(1 for _ in _grounding_items(value))
        if not n:
            continue
        new = _drop_marked(_requantise_value(value, w, h, resize, problems))
        pieces += [text[pos:start], json.dumps(new, ensure_ascii=False)]
        pos, count = end, count + n
    pieces.append(text[pos:])
    return "".join(pieces), count, problems


def convert_qwen25(path: Path, images: Path | None = None, **resize) -> tuple[list[dict], ConversionReport]:
    """Re-quantise a legacy Qwen2.5-VL dataset (official format, .json or .jsonl) to 0–1000.

    Each sample must have one image; its original size comes from ``width``/``height`` keys or the
    image file under ``images``. Every turn's bbox_2d / point_2d JSON is converted; the rest of the
    sample is kept. Multi-image samples are skipped (which image a box belongs to is ambiguous).
    """
    report, samples = ConversionReport(), []
    for where, rec in _read_records(path):
        report.images += 1
        image = rec.get("image")
        if isinstance(image, list):
            image = image[0] if len(image) == 1 else None
        if not isinstance(image, str):
            report.skipped_images += 1
            report.note(where, ["needs exactly one image to know what the boxes refer to; skipped"])
            continue
        size = _image_size(ImageAnn(image, [], rec.get("width"), rec.get("height")), images)
        if isinstance(size, str):
            report.skipped_images += 1
            report.note(where, [size])
            continue
        out = dict(rec)
        out["conversations"] = []
        for t, turn in enumerate(rec.get("conversations", [])):
            new_value, n, problems = requantise_text(turn.get("value", ""), *size, **resize)
            report.objects += n
            dropped = sum("dropped" in p for p in problems)
            report.dropped += dropped
            report.clamped += len(problems) - dropped
            report.note(f"{where} turn {t}", problems)
            out["conversations"].append({**turn, "value": new_value})
        samples.append(out)
    report.samples = len(samples)
    return samples, report


FORMATS = ("coco", "voc", "jsonl", "qwen25")


def convert(fmt: str, source: Path, images: Path | None = None, templates: Templates | None = None,
            mode: str = "per_label", fence: bool = False) -> tuple[list[dict], ConversionReport]:
    """Dispatch used by ``qvl data bbox``: read ``source`` in ``fmt`` and return (samples, report)."""
    readers = {"coco": read_coco, "voc": read_voc, "jsonl": read_xyxy_jsonl}
    if fmt == "qwen25":
        return convert_qwen25(source, images)
    if fmt not in readers:
        raise QvlError(f"unknown box format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}")
    return annotations_to_samples(readers[fmt](source), images, templates, mode, fence)
