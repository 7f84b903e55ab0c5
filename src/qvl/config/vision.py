"""Pixel and frame budgets: the one place their defaults and their meaning are written down.

Defaults are the official fine-tuning defaults (``qwen-vl-finetune/argument.py``), so a run
ported from the official scripts sees the same images. Pixel counts are H*W after resizing;
one visual token covers 32x32 pixels in Qwen3-VL (16 px patches, 2x2 merge), and a video
merges frame pairs, so a video costs ``frames/2 * H*W / 1024`` tokens.

``video_min_pixels`` / ``video_max_pixels`` bound the whole clip (frames x H x W), as the
official code writes them into the Qwen3-VL video processor's ``size``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PIXELS_PER_TOKEN = 32 * 32  # patch 16 x spatial merge 2, squared


@dataclass(frozen=True)
class VisionBudget:
    min_pixels: int = 28 * 28 * 16  # 12,544
    max_pixels: int = 28 * 28 * 576  # 451,584 (~441 tokens per image)
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 8
    video_min_pixels: int = 256 * 28 * 28  # 200,704 (whole clip)
    video_max_pixels: int = 1024 * 28 * 28  # 802,816 (whole clip)

    def __post_init__(self):
        for name, lo, hi in (("min_pixels", self.min_pixels, self.max_pixels),
                             ("video_min_pixels", self.video_min_pixels, self.video_max_pixels),
                             ("video_min_frames", self.video_min_frames, self.video_max_frames)):
            if lo <= 0 or hi < lo:
                raise ValueError(f"{name}={lo} must be > 0 and not above its max ({hi})")
        if self.video_fps <= 0:
            raise ValueError(f"video_fps={self.video_fps} must be > 0")

    def images_kwargs(self) -> dict:
        return {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}

    def videos_kwargs(self) -> dict:
        # Frames are sampled by qvl (PyAV); the processor must not sample again.
        return {"size": {"shortest_edge": self.video_min_pixels, "longest_edge": self.video_max_pixels},
                "do_sample_frames": False, "cap_pixels_per_frame": False}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_processor(cls, processor) -> VisionBudget:
        """The budgets a checkpoint's saved processor uses (inference defaults)."""
        ip, vp = processor.image_processor, processor.video_processor
        return cls(
            min_pixels=int(ip.size["shortest_edge"]), max_pixels=int(ip.size["longest_edge"]),
            video_fps=float(getattr(vp, "fps", 2.0) or 2.0),
            video_min_frames=int(getattr(vp, "min_frames", 4) or 4),
            video_max_frames=int(getattr(vp, "max_frames", 768) or 768),
            video_min_pixels=int(vp.size["shortest_edge"]), video_max_pixels=int(vp.size["longest_edge"]),
        )
