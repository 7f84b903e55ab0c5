import dataclasses

import pytest
import torch

from helpers import write_image, write_video
from qvl.config.vision import VisionBudget
from qvl.data.collate import collate
from qvl.data.media import frame_timestamps
from qvl.data.preprocess import IGNORE_INDEX, TooLong, count_tokens, encode
from qvl.data.samples import parse_sample


def _sample(tmp_path, raw):
    sample, problems = parse_sample(raw, 0, tmp_path)
    assert problems == []
    return sample


def _spans(labels):
    """(start, end) of each run of labelled tokens."""
    on = (labels != IGNORE_INDEX).tolist() + [False]
    spans, start = [], None
    for i, v in enumerate(on):
        if v and start is None:
            start = i
        if not v and start is not None:
            spans.append((start, i))
            start = None
    return spans


def test_label_mask_covers_exactly_each_assistant_reply_and_its_im_end(tmp_path, tiny_processor):
    write_image(tmp_path / "a.png", 200, 120)
    tok = tiny_processor.tokenizer
    replies = ["red", "two circles\nand a square", " spaced out "]
    raw = {"image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": replies[0]},
        {"from": "human", "value": "How many?"}, {"from": "gpt", "value": replies[1]},
        {"from": "human", "value": "Again?"}, {"from": "gpt", "value": replies[2]}]}
    enc = encode(_sample(tmp_path, raw), tiny_processor, VisionBudget())
    spans = _spans(enc.labels)
    assert [tok.decode(enc.input_ids[s:e]) for s, e in spans] == [r + "<|im_end|>" for r in replies]
    for s, _ in spans:  # each span starts right after "<|im_start|>assistant\n"
        assert tok.decode(enc.input_ids[:s]).endswith("<|im_start|>assistant\n")
    # nothing else is trained: no system/user text, no vision tokens
    assert int((enc.labels != IGNORE_INDEX).sum()) == sum(e - s for s, e in spans)
    assert not bool(((enc.mm_token_type_ids != 0) & (enc.labels != IGNORE_INDEX)).any())


def test_system_prompt_is_not_trained(tmp_path, tiny_processor):
    raw = {"messages": [{"role": "system", "content": "Answer like an assistant would."},
                        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    enc = encode(_sample(tmp_path, raw), tiny_processor, VisionBudget())
    assert tiny_processor.tokenizer.decode(enc.input_ids[enc.labels != IGNORE_INDEX]) == "hello<|im_end|>"


def test_image_budget_controls_visual_tokens_without_touching_the_processor(tmp_path, tiny_processor):
    write_image(tmp_path / "a.png", 640, 480)
    raw = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    sample = _sample(tmp_path, raw)
    before = dict(tiny_processor.image_processor.size)
    small = encode(sample, tiny_processor, VisionBudget(min_pixels=1024, max_pixels=32 * 32 * 16))
    big = encode(sample, tiny_processor, VisionBudget(min_pixels=1024, max_pixels=32 * 32 * 64))
    n_small = int((small.mm_token_type_ids == 1).sum())
    n_big = int((big.mm_token_type_ids == 1).sum())
    assert n_small <= 16 < n_big <= 64
    assert n_small == int(small.image_grid_thw.prod()) // 4
    assert dict(tiny_processor.image_processor.size) == before  # inference budgets stay in the processor


def test_video_prompt_has_correct_timestamps(tmp_path, tiny_processor):
    write_video(tmp_path / "v.mp4", frames=16, fps=8)
    raw = {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nWhere?"}, {"from": "gpt", "value": "left"}]}
    enc = encode(_sample(tmp_path, raw), tiny_processor, VisionBudget(video_fps=2, video_min_frames=4))
    text = tiny_processor.tokenizer.decode(enc.input_ids)
    expected = [f"<{t:.1f} seconds>" for t in frame_timestamps([0, 5, 10, 15], 8.0)]
    assert expected == ["<0.3 seconds>", "<1.6 seconds>"]
    positions = [text.index(s) for s in expected]
    assert positions == sorted(positions)
    assert enc.video_grid_thw.tolist()[0][0] == 2  # 4 frames merged in pairs
    assert int((enc.mm_token_type_ids == 2).sum()) == int(enc.video_grid_thw.prod()) // 4


def test_count_tokens_is_exact(tmp_path, tiny_processor):
    write_image(tmp_path / "a.png", 333, 211)
    write_image(tmp_path / "b.png", 64, 500)
    write_video(tmp_path / "v.mp4", frames=24, fps=8, w=128, h=96)
    raws = [
        {"image": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image> and <image> differ?"},
                                                        {"from": "gpt", "value": "yes"}]},
        {"video": "v.mp4", "image": "a.png", "conversations": [{"from": "human", "value": "<video><image>same?"},
                                                               {"from": "gpt", "value": "no"}]},
        {"conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "fine"}]},
    ]
    for budget in (VisionBudget(), VisionBudget(max_pixels=32 * 32 * 8, min_pixels=1024, video_min_pixels=4096,
                                                     video_max_pixels=32 * 32 * 2 * 20)):
        for raw in raws:
            sample = _sample(tmp_path, raw)
            assert count_tokens(sample, tiny_processor, budget) == len(encode(sample, tiny_processor, budget))


def test_over_long_samples_raise_instead_of_being_cut(tmp_path, tiny_processor):
    write_image(tmp_path / "a.png", 640, 480)
    raw = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    sample = _sample(tmp_path, raw)
    n = len(encode(sample, tiny_processor, VisionBudget()))
    with pytest.raises(TooLong) as e:
        encode(sample, tiny_processor, VisionBudget(), max_length=n - 1)
    assert e.value.length == n
    assert len(encode(sample, tiny_processor, VisionBudget(), max_length=n)) == n


def test_collated_batch_trains_and_generates(tmp_path, tiny):
    model, processor = tiny
    write_image(tmp_path / "a.png", 200, 100)
    write_video(tmp_path / "v.mp4")
    raws = [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image>colour?"}, {"from": "gpt", "value": "red"}]},
        {"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>where?"}, {"from": "gpt", "value": "left side"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello there"}]},
    ]
    encs = [encode(_sample(tmp_path, r), processor, VisionBudget()) for r in raws]
    batch = collate(encs, processor.tokenizer.pad_token_id)
    longest = max(len(e) for e in encs)
    assert batch["input_ids"].shape == (3, longest)
    assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in encs]
    assert batch["labels"][2, len(encs[2]):].eq(IGNORE_INDEX).all()
    with torch.no_grad():
        loss = model(**batch).loss
    assert torch.isfinite(loss)
    # the padded batch gives the same per-sample loss as one sample alone
    with torch.no_grad():
        alone = model(**collate([encs[0]], processor.tokenizer.pad_token_id)).logits[0]
        batched = model(**batch).logits[0, : len(encs[0])]
    assert torch.allclose(alone, batched, atol=1e-4)
    # generation: left padding, prompts only
    prompts = [encode(dataclasses.replace(_sample(tmp_path, r), messages=_sample(tmp_path, r).messages[:-1]),
                      processor, for_generation=True) for r in raws]
    gen_batch = collate(prompts, processor.tokenizer.pad_token_id, padding_side="left")
    assert "labels" not in gen_batch
    out = model.generate(**gen_batch, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 3


def test_prompt_with_kept_images_equals_encode(tmp_path, tiny_processor):
    """A request's images taken from the processed-image cache (qvl.infer.image_cache): the same tokens, pixels,
    grids and content keys as encode(for_generation=True), the first time and when kept; a data: URL and a path are
    kept, a changed file is processed again; a video, or no cache, goes through encode()."""
    import base64
    import os

    from qvl.data.preprocess import encode_prompt
    from qvl.data.samples import Media, Message, Sample
    from qvl.infer.image_cache import ProcessedImages
    from qvl.infer.vision_cache import media_keys

    write_image(tmp_path / "a.png", 333, 211)
    write_image(tmp_path / "b.png", 64, 500)
    url = "data:image/png;base64," + base64.b64encode((tmp_path / "b.png").read_bytes()).decode()
    sample = Sample([Message("system", ["be brief"]),
                     Message("user", [Media("image", str(tmp_path / "a.png")), "and", Media("image", url), "differ?"]),
                     Message("assistant", ["yes"]), Message("user", ["how?"])])
    for budget in (None, VisionBudget(max_pixels=32 * 32 * 8, min_pixels=1024)):
        cache = ProcessedImages(64 * 2**20)
        want = encode(sample, tiny_processor, budget, for_generation=True)
        for _ in range(2):
            got = encode_prompt(sample, tiny_processor, budget, images=cache)
            for name in ("input_ids", "mm_token_type_ids", "pixel_values", "image_grid_thw"):
                assert torch.equal(getattr(got, name), getattr(want, name)), name
            assert got.labels is None and media_keys(got) == media_keys(want)
        assert (cache.misses, cache.hits) == (2, 2)
        with pytest.raises(TooLong):
            encode_prompt(sample, tiny_processor, budget, max_length=len(want) - 1, images=cache)
    write_image(tmp_path / "a.png", 211, 333)  # the same path, other pixels
    os.utime(tmp_path / "a.png", ns=(1, 1))
    got = encode_prompt(sample, tiny_processor, None, images=cache)
    assert torch.equal(got.pixel_values, encode(sample, tiny_processor, None, for_generation=True).pixel_values)
    write_video(tmp_path / "v.mp4", frames=8, fps=8, w=64, h=48)
    video = Sample([Message("user", [Media("video", str(tmp_path / "v.mp4")), "what?"])])
    before = (cache.misses, cache.hits)
    assert torch.equal(encode_prompt(video, tiny_processor, None, images=cache).input_ids,
                       encode(video, tiny_processor, None, for_generation=True).input_ids)
    assert (cache.misses, cache.hits) == before
