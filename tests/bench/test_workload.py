"""bench/workload.py: the video-heavy workload is what its rows claim under the video YAML's own settings."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from workload import VIDEO_BUDGET, make_video_workload  # noqa: E402


def test_video_samples_are_4k_to_16k_tokens_with_every_frame_under_the_video_yaml(tmp_path, tiny_processor):
    from qvl.data.preprocess import encode
    from qvl.data.samples import parse_sample
    from qvl.train.config import load_config

    cfg = load_config(REPO / "examples" / "lora_8b_video.yaml")
    budget = cfg.vision_budget()
    assert {k: getattr(budget, k) for k in VIDEO_BUDGET} == VIDEO_BUDGET  # one budget: the bench's and the YAML's
    rows = make_video_workload(tmp_path, n=2, seed=1)
    for i, row in enumerate(rows):
        frames = len(row["video"][0])
        assert frames in (8, 12, 16)
        enc = encode(parse_sample(row, i, tmp_path)[0], tiny_processor, budget, cfg.model_max_length)
        t, h, w = (int(x) for x in enc.video_grid_thw[0])
        assert t * 2 == frames  # every frame kept (frame pairs)
        assert 4000 <= len(enc) <= 16384
        assert (h // 2) * (w // 2) * t > 0.9 * len(enc) - 700  # the sample is mostly video
