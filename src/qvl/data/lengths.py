"""A cheap token-length estimate per record, for splitting work between ranks (``balance_tokens``).

Every rank computes the same number for the same record, without encoding it:

- text: the tokenizer on the rendered chat template (exact; each image / video placeholder counts once);
- images: the size from the file header (no pixel decoding) through the processor's own resize arithmetic
  (:func:`qvl.data.preprocess.image_tokens`, as ``count_tokens`` does): exact;
- videos: frames as the loader would sample them (a file's frame count and fps from ``probe_video``, a frame
  list's length) times the processor's tokens per frame pair, plus ~8 timestamp / marker tokens per pair:
  a close estimate (the real ``<t seconds>`` text varies by a token or two).

A pack (a list of samples) is the sum of its samples. Anything that fails (unreadable file, invalid
sample) counts as :data:`FALLBACK_TOKENS`: the estimate only steers balancing and never decides what is
trained; the encoder reports the real problem later, as it always did.
"""

from __future__ import annotations

import copy

from qvl.config.vision import VisionBudget

FALLBACK_TOKENS = 256  # a record whose estimate fails: it is most likely skipped by the encoder anyway
FRAME_PAIR_MARKER_TOKENS = 8  # "<1.5 seconds>" + <|vision_start|> + <|vision_end|> per frame pair (Qwen3-VL)


def _video_tokens(media, processor, budget: VisionBudget | None) -> int:
    from qvl.data.media import (
        TEMPORAL_PATCH,
        image_size,
        probe_video,
        sample_frame_indices,
    )
    from qvl.data.preprocess import processor_kwargs, video_sampling

    how = video_sampling(media, budget, processor)
    if isinstance(media.source, (list, tuple)):  # a frame list shot at sample_fps
        total, source_fps = len(media.source), how["sample_fps"]
        width, height = image_size(media.source[0])
    else:
        info = probe_video(str(media.source).removeprefix("file://"))
        total, source_fps, width, height = info.total_frames, info.fps, info.width, info.height
    frames = len(sample_frame_indices(total, source_fps, how["fps"], how["min_frames"], how["max_frames"]))
    vp = processor.video_processor
    kwargs = dict(processor_kwargs(budget)["videos_kwargs"])
    size = kwargs.get("size") or {}
    if size:  # transformers 5.17 reads the budget here as min_pixels / max_pixels, 5.24 from `size`
        kwargs.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    if kwargs.get("cap_pixels_per_frame") is False and getattr(vp, "cap_pixels_per_frame", None):
        # get_num_of_video_patches reads the budget's `cap_pixels_per_frame=False` as `False or the processor's
        # own` (True in Qwen3-VL checkpoints), so it capped frames the resize keeps whole: clips of large frames
        # were estimated at a third of their tokens (4,523 for 12,509), and every plan made from the estimate with
        # them (transformers 5.17 and 5.24)
        vp = copy.copy(vp)
        vp.cap_pixels_per_frame = False
    patches = vp.get_num_of_video_patches(frames, height, width, kwargs)
    return patches // vp.merge_size ** 2 + frames // TEMPORAL_PATCH * FRAME_PAIR_MARKER_TOKENS


def sample_tokens(raw: dict, processor, budget: VisionBudget | None, data_path=None) -> int:
    """Estimated tokens of one raw sample (see the module docstring); FALLBACK_TOKENS when it cannot tell."""
    from qvl.data.media import image_size
    from qvl.data.preprocess import image_tokens, render
    from qvl.data.samples import parse_sample

    try:
        sample, _ = parse_sample(raw, -1, data_path, "")
        if sample is None:
            return FALLBACK_TOKENS
        text = render(processor, sample.messages)  # one placeholder token per image / video
        n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        for m in sample.media():
            if m.kind == "image":
                width, height = image_size(m.source)
                n += image_tokens(processor, budget, height, width) - 1
            else:
                n += _video_tokens(m, processor, budget) - 1
        return n
    except Exception:  # noqa: BLE001 - only steers balancing: encoding reports the real problem
        return FALLBACK_TOKENS


class TokenEstimate:
    """``estimate(i)``: estimated tokens of record ``i`` (a pack: the sum of its samples), cached;
    ``estimate.samples(i)``: each sample's.

    Holds the records, the processor and the budget the encoder uses, so DataLoader workers can run it
    (it pickles with them); each worker fills its own cache for the micro-batches it builds.
    """

    def __init__(self, records, processor, budget: VisionBudget | None):
        self.records, self.processor, self.budget = records, processor, budget
        self._cache: dict[int, list[int]] = {}

    def __call__(self, i: int) -> int:
        return sum(self.samples(i))

    def samples(self, i: int) -> list[int]:
        """Estimated tokens of each sample of record ``i`` (one for a plain record, one per sample of a pack)."""
        if i not in self._cache:
            rec = self.records[i]
            raws = rec.raw if isinstance(rec.raw, list) else [rec.raw]
            self._cache[i] = [sample_tokens(raw, self.processor, self.budget, rec.data_path) for raw in raws]
        return self._cache[i]
