import numpy as np
import pytest

from helpers import write_image, write_video
from qvl.data.media import frame_timestamps, load_image, load_video, probe_video, sample_frame_indices
from qvl.errors import QvlError


def test_frame_sampling_matches_the_qwen3vl_rule():
    # 16 frames at 8 fps = 2 s; 2 fps wants 4 frames, evenly spaced
    assert sample_frame_indices(16, 8.0, 2.0, 4, 768) == [0, 5, 10, 15]
    # a long clip is capped at max_frames
    assert len(sample_frame_indices(3000, 30.0, 2.0, 4, 8)) == 8
    # frames come in pairs; a 1-frame video repeats its frame
    assert sample_frame_indices(1, 8.0, 2.0, 4, 768) == [0, 0]
    assert len(sample_frame_indices(7, 8.0, 2.0, 4, 768)) % 2 == 0


def test_decoded_frames_and_timestamps_match_known_frame_times(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames=16, fps=8)
    info = probe_video(str(path))
    assert (info.total_frames, info.fps, info.width, info.height) == (16, 8.0, 96, 64)
    frames, meta = load_video(str(path), fps=2.0, min_frames=4, max_frames=768)
    assert frames.shape == (4, 64, 96, 3) and frames.dtype == np.uint8
    assert meta.frames_indices == [0, 5, 10, 15]
    # frame i was written with brightness 15*i: the decoded frames are the sampled ones
    assert [round(float(f.mean()) / 15) for f in frames] == [0, 5, 10, 15]
    # the model sees the mean time of each merged pair: (0 + 5/8)/2 and (10/8 + 15/8)/2
    assert frame_timestamps(meta.frames_indices, meta.fps) == [0.3125, 1.5625]


def test_bad_media_are_clear_errors(tmp_path):
    with pytest.raises(QvlError, match="not found"):
        load_image(str(tmp_path / "nope.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(QvlError, match="cannot decode image"):
        load_image(str(tmp_path / "broken.png"))
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42garbage")
    with pytest.raises(QvlError, match="video"):
        load_video(str(tmp_path / "broken.mp4"))


def test_image_sources(tmp_path):
    import base64

    path = write_image(tmp_path / "a.png")
    data = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), "file://" + str(path), data, path.read_bytes()):
        assert load_image(src).size == (96, 64)


@pytest.mark.parametrize("video_fps,frames,fps,max_frames", [
    (8, 16, 2.0, 768),   # 2 s
    (30, 90, 2.0, 8),    # 3 s, capped at 8 frames: spread over the whole clip, not truncated
    (24, 240, 1.0, 16),  # 10 s
    (25, 50, 4.0, 768),  # 2 s at 4 fps
    (10, 7, 2.0, 768),   # shorter than min_frames
])
def test_sampled_frames_and_timestamps_agree(tmp_path, video_fps, frames, fps, max_frames):
    from helpers import read_index, write_indexed_video

    path = write_indexed_video(tmp_path / "idx.mp4", frames, video_fps)
    decoded, meta = load_video(str(path), fps=fps, min_frames=4, max_frames=max_frames)
    seen = [read_index(f) for f in decoded]
    assert seen == meta.frames_indices  # the frames we hand over are the frames we claim
    assert len(seen) % 2 == 0 and len(seen) <= max(max_frames, 2)
    assert seen[0] == 0 and seen[-1] == frames - 1  # the whole clip is covered
    want = min(max(int(frames / video_fps * fps), 4), max_frames, frames)
    assert len(seen) == max(2, want - want % 2)
    stamps = frame_timestamps(meta.frames_indices, meta.fps)
    assert stamps == [pytest.approx((seen[i] + seen[i + 1]) / 2 / video_fps) for i in range(0, len(seen), 2)]


def test_frame_lists_use_the_same_sampling_and_timestamps(tmp_path, tiny_processor):
    from PIL import Image

    from qvl.config.vision import VisionBudget
    from qvl.data.preprocess import encode
    from qvl.data.samples import parse_sample

    files = []
    for i in range(12):
        arr = np.full((64, 96, 3), 20 * i, np.uint8)
        Image.fromarray(arr).save(tmp_path / f"f{i:02d}.png")
        files.append(f"f{i:02d}.png")
    raw = {"video": [files], "sample_fps": 4, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "it brightens"}]}
    sample, problems = parse_sample(raw, 0, tmp_path)
    assert problems == [] and sample.media()[0].options == {"sample_fps": 4}
    enc = encode(sample, tiny_processor, VisionBudget(video_fps=2.0))
    # 12 frames at 4 fps = 3 s -> 6 frames at 2 fps: indices 0,2,4,7,9,11 -> pairs at 0.25, 1.38, 2.5 s
    text = tiny_processor.tokenizer.decode(enc.input_ids)
    assert [s for s in ("<0.2 seconds>", "<1.4 seconds>", "<2.5 seconds>") if s in text] == \
        ["<0.2 seconds>", "<1.4 seconds>", "<2.5 seconds>"]
    assert enc.video_grid_thw.tolist()[0][0] == 3


def test_a_process_forked_beside_a_thread_that_decoded_video_does_not_hang(tmp_path):
    """A thread that decoded a video and lives on (a server's worker, an engine thread) must not make a later fork
    (a DataLoader's workers) hang: PyAV's frame.to_ndarray(format=...) keeps a converter per thread for the thread's
    life, and the forked child frees it with its slice threads gone (os.fork() never returned: clean-clone CI,
    2026-12-07). load_video converts with a converter of its own, to the same pixels."""
    import os
    import threading
    import time

    import av

    path = write_video(tmp_path / "clip.mp4", frames=8, fps=4)
    decoded, hold = threading.Event(), threading.Event()
    got = {}

    def decode():
        got["frames"] = load_video(str(path))[0]
        decoded.set()
        hold.wait()

    threading.Thread(target=decode, daemon=True).start()
    try:
        assert decoded.wait(60)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        deadline = time.monotonic() + 30
        while not os.waitpid(pid, os.WNOHANG)[0]:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung freeing a video decoder thread's state")
            time.sleep(0.05)
    finally:
        hold.set()
    with av.open(str(path)) as container:  # the same frames as PyAV's own conversion
        want = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    indices = sample_frame_indices(len(want), 4.0, 2.0, 4, 768)
    np.testing.assert_array_equal(got["frames"], np.stack([want[i] for i in indices]))
