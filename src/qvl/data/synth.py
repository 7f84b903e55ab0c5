"""A synthetic dataset of coloured shapes: images, short videos and a registry, made offline in seconds.

It exists so the demo, the tests and a tiny CPU model have real data in the official fine-tuning format
without a download: every answer is known exactly (colour, shape, count, and grounding boxes computed
from the pixels actually drawn), images are small (128–384 px) and videos are a few seconds long.
Generation is deterministic: each sample draws from its own ``numpy`` generator seeded by
``(seed, kind, index)``, so the same seed gives byte-identical files regardless of order or workers.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from qvl.data.grounding import Templates, format_answer, to_qwen3
from qvl.errors import QvlError
from qvl.utils.fs import atomic_dir

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")

# Question mix for single-turn samples; "multi" is a two-round conversation about one image.
QUESTION_WEIGHTS = {"colour": 0.22, "shape": 0.18, "count": 0.18, "grounding": 0.27, "multi": 0.15}

IMAGE_SIDE = (128, 384)
VIDEO_SIDES = (96, 112, 128, 144, 160)  # multiples of 16: every encoder and yuv420p accept them
VIDEO_FPS = 8
VIDEO_SECONDS = (2, 3, 4)
GAP = 6  # pixels kept free between shapes, so each box holds exactly one shape
JPEG = {"format": "JPEG", "quality": 92, "subsampling": 0}  # 4:4:4 keeps shape edges crisp


@dataclass
class Shape:
    """One drawn shape and its exact pixel box ``[x1, y1, x2, y2]`` (continuous, right/bottom exclusive)."""

    kind: str
    colour: str
    box: list[int]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass
class Scene:
    image: Image.Image
    shapes: list[Shape]


@dataclass
class ShapesSummary:
    """What :func:`make_shapes` wrote; ``str()`` is the CLI's report."""

    out: Path
    counts: dict[str, dict[str, int]]  # split -> question type -> samples
    videos: int
    video_samples: int
    codec: str
    seconds: float
    files: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"wrote {self.out} in {self.seconds:.1f} s"]
        for split, by_type in self.counts.items():
            detail = ", ".join(f"{k} {v}" for k, v in sorted(by_type.items()))
            lines.append(f"  {split:<6} {sum(by_type.values()):>6} samples ({detail})")
        lines.append(f"  videos {self.videos:>6} mp4 ({self.codec}, {VIDEO_FPS} fps), {self.video_samples} samples")
        lines += [f"  {name:<14} {path}" for name, path in self.files.items()]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------

def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A low-saturation grey gradient with per-pixel noise: busy enough to matter, never a shape colour.

    Integer noise (int16) rather than float normals: this is most of the generation time.
    """
    base = (rng.uniform(100, 160) + rng.uniform(-8, 8, size=3)).astype(np.float32)
    gx, gy = rng.uniform(-15, 15, size=2)
    ramp = (np.linspace(-gx, gx, w, dtype=np.float32)[None, :, None]
            + np.linspace(-gy, gy, h, dtype=np.float32)[:, None, None] + base).astype(np.int16)
    noise = rng.integers(-12, 13, size=(h, w, 3), dtype=np.int16)
    return np.clip(ramp + noise, 0, 255).astype(np.uint8)


def _shape_mask(kind: str, size: int) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    if kind == "circle":
        draw.ellipse([0, 0, size - 1, size - 1], fill=255)
    elif kind == "square":
        draw.rectangle([0, 0, size - 1, size - 1], fill=255)
    else:
        draw.polygon([(size / 2, 0), (size - 1, size - 1), (0, size - 1)], fill=255)
    return mask


def draw_shape(image: Image.Image, kind: str, colour: str, x: int, y: int, size: int) -> list[int]:
    """Paint one shape with its top-left corner at (x, y); return the box of the pixels really painted."""
    mask = _shape_mask(kind, size)
    image.paste(COLOURS[colour], (x, y), mask)
    left, top, right, bottom = mask.getbbox()
    return [x + left, y + top, x + right, y + bottom]


def _place(rng: np.random.Generator, w: int, h: int, count: int) -> list[tuple[int, int, int]]:
    """Up to ``count`` non-overlapping squares ``(x, y, size)`` with GAP pixels between them."""
    placed: list[tuple[int, int, int]] = []
    side = min(w, h)
    for _ in range(count * 30):
        if len(placed) == count:
            break
        size = int(rng.integers(max(20, side * 18 // 100), max(21, side * 34 // 100)))
        x, y = int(rng.integers(0, w - size + 1)), int(rng.integers(0, h - size + 1))
        if all(x + size + GAP <= px or px + ps + GAP <= x or y + size + GAP <= py or py + ps + GAP <= y
               for px, py, ps in placed):
            placed.append((x, y, size))
    return placed


def render_scene(seed: int, index: int, attempt: int = 0) -> Scene:
    """The image of sample ``index``: 1–4 shapes on a noisy background, sizes 128–384 px."""
    rng = np.random.default_rng([seed, 0, index, attempt])
    w, h = (int(v) for v in rng.integers(IMAGE_SIDE[0], IMAGE_SIDE[1] + 1, size=2))
    image = Image.fromarray(_background(rng, w, h))
    shapes = []
    for x, y, size in _place(rng, w, h, int(rng.integers(1, 5))):
        kind, colour = SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))]
        shapes.append(Shape(kind, colour, draw_shape(image, kind, colour, x, y, size)))
    return Scene(image, shapes)


# --------------------------------------------------------------------------------------------------
# Questions: each returns (question, answer) or None when the scene cannot answer it unambiguously
# --------------------------------------------------------------------------------------------------

def _plural(kind: str) -> str:
    return kind + "s"


def _unique(values: list[str]) -> list[str]:
    counts = Counter(values)
    return [v for v in counts if counts[v] == 1]


def ask_colour(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    kinds = _unique([s.kind for s in scene.shapes])
    if not kinds:
        return None
    kind = kinds[rng.integers(len(kinds))]
    return f"What colour is the {kind}?", next(s.colour for s in scene.shapes if s.kind == kind)


def ask_shape(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    colours = _unique([s.colour for s in scene.shapes])
    if not colours:
        return None
    colour = colours[rng.integers(len(colours))]
    return f"What shape is the {colour} object?", next(s.kind for s in scene.shapes if s.colour == colour)


def ask_count(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    form = rng.integers(3)
    if form == 0:
        return "How many shapes are there in the image?", str(len(scene.shapes))
    if form == 1:
        kind = SHAPES[rng.integers(len(SHAPES))]
        return f"How many {_plural(kind)} are there?", str(sum(s.kind == kind for s in scene.shapes))
    colour = scene.shapes[rng.integers(len(scene.shapes))].colour
    return f"How many {colour} shapes are there?", str(sum(s.colour == colour for s in scene.shapes))


def grounding_answer(shapes: list[Shape], w: int, h: int) -> str:
    """``[{"bbox_2d": [...], "label": "red circle"}]`` on the 0–1000 scale, top-to-bottom then left-to-right."""
    ordered = sorted(shapes, key=lambda s: (s.box[1], s.box[0]))
    return format_answer([{"bbox_2d": to_qwen3(s.box, w, h), "label": s.label} for s in ordered])


def ask_grounding(scene: Scene, rng: np.random.Generator) -> tuple[str, str]:
    """Ask for one shape kind present in the image (often several boxes), or for every shape."""
    w, h = scene.image.size
    kinds = sorted({s.kind for s in scene.shapes}, key=SHAPES.index)
    pick = rng.integers(len(kinds) + 1)
    if pick == len(kinds):
        target, shapes = "shape", scene.shapes
    else:
        target = kinds[pick]
        shapes = [s for s in scene.shapes if s.kind == target]
    return Templates().per_label.format(label=target), grounding_answer(shapes, w, h)


ASKERS = {"colour": ask_colour, "shape": ask_shape, "count": ask_count, "grounding": ask_grounding}


def _conversation(rounds: list[tuple[str, str]], tag: str) -> list[dict]:
    """Official-format turns; the media tag goes once, at the start of the first human turn."""
    turns = []
    for i, (q, a) in enumerate(rounds):
        turns += [{"from": "human", "value": f"{tag}\n{q}" if i == 0 else q}, {"from": "gpt", "value": a}]
    return turns


def make_image_sample(seed: int, index: int) -> tuple[Scene, str, list[tuple[str, str]]]:
    """Scene, question type and Q/A rounds of sample ``index``.

    The type is drawn first; a scene that cannot answer it (e.g. a colour question with no shape kind
    appearing once) is redrawn from the next sub-seed, so the mix of types follows QUESTION_WEIGHTS.
    """
    rng = np.random.default_rng([seed, 1, index])
    qtype = str(rng.choice(list(QUESTION_WEIGHTS), p=list(QUESTION_WEIGHTS.values())))
    kinds = [qtype] if qtype != "multi" else [str(k) for k in rng.choice(list(ASKERS), size=2, replace=False)]
    for attempt in range(50):
        scene = render_scene(seed, index, attempt)
        rounds = [ASKERS[k](scene, rng) for k in kinds]
        if all(r is not None for r in rounds):
            return scene, qtype, rounds
    scene = render_scene(seed, index)  # practically unreachable: fall back to a count question
    return scene, "count", [ask_count(scene, rng)]


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------

@dataclass
class VideoSpec:
    kind: str
    colour: str
    direction: str
    width: int
    height: int
    frames: int
    ask: str  # the second question: "colour" or "shape"
    fps: int = VIDEO_FPS


def video_spec(seed: int, index: int) -> VideoSpec:
    rng = np.random.default_rng([seed, 2, index])
    return VideoSpec(
        kind=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        direction=DIRECTIONS[index % len(DIRECTIONS)] if index < len(DIRECTIONS) else DIRECTIONS[rng.integers(4)],
        width=int(rng.choice(VIDEO_SIDES)),
        height=int(rng.choice(VIDEO_SIDES)),
        frames=int(rng.choice(VIDEO_SECONDS)) * VIDEO_FPS,
        ask=("colour", "shape")[rng.integers(2)],
    )


def render_video(seed: int, index: int) -> tuple[VideoSpec, list[np.ndarray]]:
    """Frames (RGB uint8) of one shape crossing a static noisy background in ``spec.direction``."""
    spec = video_spec(seed, index)
    rng = np.random.default_rng([seed, 3, index])
    w, h = spec.width, spec.height
    background = _background(rng, w, h)
    size = min(w, h) // 4
    horizontal = spec.direction in ("left", "right")
    fixed = int(rng.integers(0, (h if horizontal else w) - size + 1))  # the coordinate that does not move
    span = (w if horizontal else h) - size
    frames = []
    for t in range(spec.frames):
        moving = round(t / (spec.frames - 1) * span)
        if spec.direction in ("left", "up"):
            moving = span - moving
        x, y = (moving, fixed) if horizontal else (fixed, moving)
        image = Image.fromarray(background)
        draw_shape(image, spec.kind, spec.colour, x, y, size)
        frames.append(np.asarray(image))
    return spec, frames


def pick_codec() -> str:
    """The first H.264 encoder this PyAV build has, else MPEG-4 part 2 (always bundled)."""
    import av

    for name in ("libx264", "h264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - codec missing from this ffmpeg build
            continue
    raise QvlError("this PyAV build has no H.264 or MPEG-4 encoder", fix="pip install --force-reinstall av")


def write_mp4(path: Path, frames: list[np.ndarray], fps: int, codec: str) -> None:
    """Encode RGB frames to mp4 with constant frame rate ``fps`` (pts = frame index, time base 1/fps)."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.time_base = Fraction(1, fps)
        stream.codec_context.time_base = Fraction(1, fps)
        if codec in ("libx264", "h264"):
            # With B-frames and the rc lookahead on, libx264 output differs now and then between
            # identical runs (seen ~1 in 4 at threads=1); without them it is byte-identical.
            stream.options = {"crf": "18", "preset": "veryfast", "bf": "0",
                              "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0:rc-lookahead=0:mbtree=0"}
        else:
            stream.bit_rate = 1_000_000
            stream.codec_context.thread_count = 1
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def probe_mp4(path: Path) -> tuple[int, float, int, int]:
    """Decode a video fully: (frames decoded, average fps, width, height)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        return count, float(stream.average_rate or 0), stream.codec_context.width, stream.codec_context.height


def video_samples(spec: VideoSpec, rel: str) -> list[dict]:
    """Two samples per video: the direction of motion, and the moving shape's colour or kind."""
    second = (("What colour is the moving shape?", spec.colour) if spec.ask == "colour"
              else ("What shape is moving in the video?", spec.kind))
    return [
        {"video": rel, "conversations": _conversation([("Which way does the shape move?", spec.direction)], "<video>")},
        {"video": rel, "conversations": _conversation([second], "<video>")},
    ]


# --------------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------------

def _encode_image(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, **JPEG)
    return buf.getvalue()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _registry_yaml() -> str:
    """Paths are relative to the YAML file's folder (the registry loader resolves them that way)."""
    entries = {"shapes_train": "train.jsonl", "shapes_val": "val.jsonl", "shapes_video": "videos.jsonl"}
    return "".join(f"{name}:\n  annotation_path: {ann}\n  data_path: .\n" for name, ann in entries.items())


def _progress(total: int, label: str):
    """A rich progress bar on stderr (stdout stays the summary), shown only for more than 200 items."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=total <= 200, transient=True)


def make_shapes(out, n: int = 2000, val_fraction: float = 0.1, n_videos: int = 8, seed: int = 0) -> ShapesSummary:
    """Write the synthetic shapes dataset to the new folder ``out``.

    Layout: ``images/*.jpg``, ``train.jsonl`` / ``val.jsonl`` (the last ``round(n * val_fraction)``
    samples are val), ``videos/*.mp4`` + ``videos.jsonl``, and ``datasets.yaml`` registering
    ``shapes_train``, ``shapes_val``, ``shapes_video``. The folder appears only when complete, and an
    existing non-empty ``out`` is refused. Every written video is decoded back and checked.
    """
    if n < 1:
        raise QvlError(f"--n must be at least 1, got {n}")
    if not 0 <= val_fraction < 1:
        raise QvlError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if n_videos < 0:
        raise QvlError(f"--videos must be 0 or more, got {n_videos}")
    start = time.perf_counter()
    out = Path(out)
    n_val = round(n * val_fraction)
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    counts: dict[str, Counter] = {"train": Counter(), "val": Counter()}
    codec = pick_codec() if n_videos else "-"
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        with _progress(n, "images") as bar:
            task = bar.add_task("images", total=n)
            for i in range(n):
                scene, qtype, rounds = make_image_sample(seed, i)
                rel = f"images/{i:05d}.jpg"
                (tmp / rel).write_bytes(_encode_image(scene.image))
                split = "val" if i >= n - n_val else "train"
                rows[split].append({"image": rel, "conversations": _conversation(rounds, "<image>")})
                counts[split][qtype] += 1
                bar.advance(task)
        _write_jsonl(tmp / "train.jsonl", rows["train"])
        _write_jsonl(tmp / "val.jsonl", rows["val"])
        vrows = []
        if n_videos:
            (tmp / "videos").mkdir()
        for j in range(n_videos):
            spec, frames = render_video(seed, j)
            rel = f"videos/v{j}.mp4"
            write_mp4(tmp / rel, frames, spec.fps, codec)
            got = probe_mp4(tmp / rel)
            if got != (spec.frames, float(spec.fps), spec.width, spec.height):
                raise QvlError(f"{rel} decodes as {got[0]} frames at {got[1]} fps ({got[2]}x{got[3]}), "
                               f"expected {spec.frames} at {spec.fps} ({spec.width}x{spec.height})",
                               fix=f"the {codec} encoder of this PyAV build misbehaves; reinstall av")
            vrows += video_samples(spec, rel)
        _write_jsonl(tmp / "videos.jsonl", vrows)
        (tmp / "datasets.yaml").write_text(_registry_yaml(), encoding="utf-8")
    files = {"registry": str(out / "datasets.yaml"), "train": str(out / "train.jsonl"),
             "val": str(out / "val.jsonl"), "videos": str(out / "videos.jsonl")}
    return ShapesSummary(out, {k: dict(v) for k, v in counts.items()}, n_videos, len(vrows), codec,
                         time.perf_counter() - start, files)
