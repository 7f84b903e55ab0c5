"""Reading images and videos. Videos are decoded with PyAV (no torchcodec/decord needed).

Frame sampling follows the Qwen3-VL video processor: ``n = int(total_frames / fps * target_fps)``
clamped to ``[min_frames, max_frames]`` and to the frame count, then evenly spaced indices.
``n`` is made even (frames are merged in pairs), as qwen-vl-utils does. The returned metadata
carries the real source fps and frame indices, so the processor writes correct
``<t seconds>`` timestamps (the mean time of each frame pair).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvl.errors import QvlError

TEMPORAL_PATCH = 2  # frames merged into one temporal patch (Qwen3-VL)


@dataclass(frozen=True)
class VideoInfo:
    total_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps if self.fps else 0.0


def open_image(source):
    """A PIL image from a path, file:// or data: URL, bytes or a PIL image, with only its header read:
    ``.size`` costs no pixel decoding (:func:`load_image` decodes)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray)):
        return Image.open(io.BytesIO(source))
    if isinstance(source, str) and source.startswith("data:"):
        try:
            return Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1])))
        except Exception as e:
            raise QvlError(f"data URL is not a decodable image ({type(e).__name__})") from None
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        raise QvlError(f"{source}: remote images are fetched by the server, not by the data pipeline",
                       fix="download the image and use a local path")
    path = str(source).removeprefix("file://")
    if not Path(path).is_file():
        raise QvlError(f"image file not found: {path}")
    try:
        return Image.open(path)
    except Exception as e:
        raise QvlError(f"cannot decode image {path}: {type(e).__name__}: {e}") from None


def load_image(source):
    """A PIL RGB image from a path, file:// or data: URL, bytes or a PIL image. Fully decoded."""
    img = open_image(source)
    try:
        img.load()
    except Exception as e:  # noqa: BLE001 - any decoding failure is reported with its reason
        name = "" if not isinstance(source, str) or source.startswith("data:") else f" {source.removeprefix('file://')}"
        raise QvlError(f"cannot decode image{name}: {type(e).__name__}: {e}") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def image_size(source) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding its pixels."""
    img = open_image(source)
    if img is source:
        return img.size
    with img:
        return img.size


def probe_video(path: str) -> VideoInfo:
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            total = int(stream.frames or 0)
            if total <= 0:  # some containers do not store a frame count: count packets
                total = sum(1 for p in container.demux(stream) if p.size)
            return VideoInfo(total, fps, stream.codec_context.width, stream.codec_context.height)
    except IndexError:
        raise QvlError(f"{path} has no video stream") from None
    except (av.error.FFmpegError, OSError) as e:
        raise QvlError(f"cannot open video {path}: {e}") from None


def sample_frame_indices(total_frames: int, video_fps: float, fps: float, min_frames: int, max_frames: int) -> list[int]:
    if total_frames <= 0:
        return []
    n = int(total_frames / video_fps * fps) if video_fps > 0 else total_frames
    n = min(max(n, min_frames), max_frames, total_frames)
    n = max(TEMPORAL_PATCH, n - n % TEMPORAL_PATCH)  # whole frame pairs; short clips repeat a frame
    return np.linspace(0, total_frames - 1, n).round().astype(int).tolist()


def load_video(path: str, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768):
    """(frames uint8 [T,H,W,3], VideoMetadata) for the frames sampled from ``path``."""
    import av
    from av.video.reformatter import VideoReformatter
    from transformers.video_utils import VideoMetadata

    path = str(path).removeprefix("file://")
    if not Path(path).exists():  # exists, not is_file: pipes and devices are opened (and time out in checks)
        raise QvlError(f"video file not found: {path}")
    info = probe_video(path)
    indices = sample_frame_indices(info.total_frames, info.fps, fps, min_frames, max_frames)
    if not indices:
        raise QvlError(f"video {path} has no frames")
    wanted: dict[int, int] = {}
    for i in indices:
        wanted[i] = wanted.get(i, 0) + 1
    frames: list[np.ndarray] = []
    last = max(indices)
    # this call's own converter, freed when it returns: frame.to_ndarray(format=...) keeps one per thread for the
    # thread's life (PyAV 18), and a process forked while such a thread lives (a DataLoader's workers) frees it in
    # the child, where its slice threads are gone: the child hung in os.fork() (tests/data/test_media.py)
    rgb = VideoReformatter()
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    arr = rgb.reformat(frame, format="rgb24").to_ndarray()
                    frames.extend([arr] * wanted[i])
                if i >= last:
                    break
    except av.error.FFmpegError as e:
        raise QvlError(f"cannot decode video {path}: {e}") from None
    if len(frames) < len(indices):  # the stored frame count overstated the stream
        if not frames:
            raise QvlError(f"video {path} decoded to no frames")
        decoded = len(frames)
        indices = indices[:decoded - decoded % TEMPORAL_PATCH] or indices[:1] * TEMPORAL_PATCH
        frames = (frames + [frames[-1]])[:len(indices)]
    meta = VideoMetadata(
        total_num_frames=info.total_frames, fps=info.fps, width=info.width, height=info.height,
        duration=info.duration, frames_indices=list(indices),
    )
    return np.stack(frames), meta


def load_frame_list(paths, sample_fps: float = 2.0, fps: float = 2.0, min_frames: int = 4, max_frames: int = 768):
    """A video given as image files shot at ``sample_fps``: same sampling and timestamps as a real video."""
    from transformers.video_utils import VideoMetadata

    paths = [str(p) for p in paths]
    if not paths:
        raise QvlError("frame list is empty")
    if sample_fps <= 0:
        raise QvlError(f"sample_fps={sample_fps} must be > 0")
    indices = sample_frame_indices(len(paths), sample_fps, fps, min_frames, max_frames)
    first = load_image(paths[indices[0]])
    frames = []
    for i in indices:
        img = load_image(paths[i])
        if img.size != first.size:  # frames of one clip must share a size
            img = img.resize(first.size)
        frames.append(np.asarray(img))
    meta = VideoMetadata(total_num_frames=len(paths), fps=float(sample_fps), width=first.width, height=first.height,
                         duration=len(paths) / sample_fps, frames_indices=list(indices))
    return np.stack(frames), meta


def frame_timestamps(indices: list[int], video_fps: float) -> list[float]:
    """Timestamps (s) the model sees: the mean time of each merged frame pair."""
    times = [i / video_fps for i in indices]
    if len(times) % TEMPORAL_PATCH:
        times += [times[-1]] * (TEMPORAL_PATCH - len(times) % TEMPORAL_PATCH)
    return [sum(times[i:i + TEMPORAL_PATCH]) / TEMPORAL_PATCH for i in range(0, len(times), TEMPORAL_PATCH)]
