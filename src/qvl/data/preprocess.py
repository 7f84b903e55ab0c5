"""Sample -> model inputs. Shared by training, ``data check`` and every inference path.

The chat template renders the conversation with one vision placeholder per image/video; the
real Qwen3-VL processor resizes the media and expands the placeholders (with ``<t seconds>``
timestamps for video). Labels cover each assistant reply and its ``<|im_end|>``, found from
token spans (transformers 5.17's assistant mask is broken).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qvl.config.vision import VisionBudget
from qvl.data.media import load_frame_list, load_image, load_video
from qvl.data.samples import Message, Sample, prompt_messages
from qvl.errors import QvlError
from qvl.models.tokens import token_ids

IGNORE_INDEX = -100


class TooLong(QvlError):
    def __init__(self, length: int, max_length: int, where: str = ""):
        self.length, self.max_length = length, max_length
        super().__init__(f"{length} tokens after vision expansion exceeds max length {max_length}", where=where or None,
                         fix="raise model_max_length, lower max_pixels / video_max_pixels / video_max_frames, "
                             "or drop the sample (it is never cut inside vision tokens)")


@dataclass
class Encoded:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor | None  # [L] long, IGNORE_INDEX outside assistant replies
    mm_token_type_ids: torch.Tensor  # [L] 0 text, 1 image, 2 video
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    origin: str = ""
    extra: dict = field(default_factory=dict)
    # (4, L) text + mRoPE positions for packed rows, computed where the sample is encoded (DataLoader workers) so
    # the training step does not; None: :func:`qvl.data.packing.pack` computes them
    positions: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_label_tokens(self) -> int:
        return 0 if self.labels is None else int((self.labels != IGNORE_INDEX).sum())


def render(processor, messages: list[Message], add_generation_prompt: bool = False) -> str:
    return processor.tokenizer.apply_chat_template(
        prompt_messages(messages), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def video_sampling(media, budget: VisionBudget | None, processor) -> dict:
    """How one video item's frames are sampled: ``fps``, ``min_frames``, ``max_frames`` (and ``sample_fps`` for a
    frame list) from its own options, else the budget, else the processor's."""
    vp = processor.video_processor
    fps = budget.video_fps if budget else float(vp.fps or 2.0)
    min_frames = budget.video_min_frames if budget else int(vp.min_frames)
    max_frames = budget.video_max_frames if budget else int(vp.max_frames)
    o = media.options
    out = {"fps": float(o.get("fps", fps)), "min_frames": int(o.get("min_frames", min_frames)),
           "max_frames": int(o.get("max_frames", max_frames))}
    if isinstance(media.source, (list, tuple)):
        out["sample_fps"] = float(o.get("sample_fps", 2.0))
    return out


def decode_video(media, budget: VisionBudget | None, processor):
    """(frames, metadata) for one video item, sampled as :func:`video_sampling` says."""
    how = video_sampling(media, budget, processor)
    if isinstance(media.source, (list, tuple)):
        return load_frame_list(media.source, **how)
    return load_video(media.source, **how)


def load_media(sample_or_messages, budget: VisionBudget | None, processor):
    """(images, videos, video_metadata) in prompt order."""
    messages = sample_or_messages.messages if isinstance(sample_or_messages, Sample) else sample_or_messages
    images, videos, metas = [], [], []
    for msg in messages:
        for m in msg.media():
            if m.kind == "image":
                images.append(load_image(m.source))
            else:
                frames, meta = decode_video(m, budget, processor)
                videos.append(frames)
                metas.append(meta)
    return images, videos, metas


def processor_kwargs(budget: VisionBudget | None) -> dict:
    if budget is None:  # the checkpoint's own (inference) budgets; frames are already sampled
        return {"videos_kwargs": {"do_sample_frames": False}}
    return {"images_kwargs": budget.images_kwargs(), "videos_kwargs": budget.videos_kwargs()}


def image_tokens(processor, budget: VisionBudget | None, height: int, width: int, where: str | None = None) -> int:
    """Vision tokens of one ``height`` x ``width`` image: the processor's own resize arithmetic, no pixels."""
    ip = processor.image_processor
    # get_number_of_image_patches reads min_pixels/max_pixels, not the size dict the call path uses
    size = processor_kwargs(budget).get("images_kwargs", {}).get("size")
    images_kwargs = {"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"]} if size else {}
    try:
        return ip.get_number_of_image_patches(height, width, images_kwargs) // ip.merge_size ** 2
    except ValueError as e:
        raise QvlError(f"processor rejected the image: {e}", where=where) from None


def assistant_label_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True on every token of each assistant reply, through its <|im_end|>.

    A reply starts after ``<|im_start|>assistant`` and the newline token; if the reply's own
    leading whitespace merged into that newline token, the merged token is part of the reply.
    """
    ids = token_ids(tokenizer)
    role = tokenizer.encode("assistant", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    seq = input_ids.tolist()
    mask = torch.zeros(len(seq), dtype=torch.bool)
    i, n = 0, len(seq)
    while i < n:
        if seq[i] == ids.im_start and seq[i + 1:i + 1 + len(role)] == role:
            start = i + 1 + len(role)
            if seq[start:start + len(newline)] == newline:
                start += len(newline)
            end = start
            while end < n and seq[end] != ids.im_end:
                end += 1
            mask[start:min(end + 1, n)] = True  # the reply and its <|im_end|>
            i = end + 1
        else:
            i += 1
    return mask


def encode(sample: Sample, processor, budget: VisionBudget | None = None, max_length: int | None = None,
           for_generation: bool = False) -> Encoded:
    """Tokenise one sample with its media. ``for_generation`` renders the prompt for a new reply."""
    text = render(processor, sample.messages, add_generation_prompt=for_generation)
    images, videos, metas = load_media(sample, budget, processor)
    try:
        out = processor(
            text=[text], images=images or None, videos=videos or None, video_metadata=metas or None,
            return_tensors="pt", return_mm_token_type_ids=True, **processor_kwargs(budget),
        )
    except ValueError as e:  # e.g. an aspect ratio above 200, an image smaller than a patch
        raise QvlError(f"processor rejected the media: {e}", where=sample.origin or None) from None
    input_ids = out["input_ids"][0]
    if max_length is not None and len(input_ids) > max_length:
        raise TooLong(len(input_ids), max_length, sample.origin)
    labels = None
    if not for_generation:
        labels = torch.where(assistant_label_mask(input_ids, processor.tokenizer), input_ids,
                             torch.full_like(input_ids, IGNORE_INDEX))
    return Encoded(
        input_ids=input_ids,
        labels=labels,
        mm_token_type_ids=out["mm_token_type_ids"][0],
        pixel_values=out.get("pixel_values"),
        image_grid_thw=out.get("image_grid_thw"),
        pixel_values_videos=out.get("pixel_values_videos"),
        video_grid_thw=out.get("video_grid_thw"),
        origin=sample.origin,
    )


def encode_prompt(sample: Sample, processor, budget: VisionBudget | None = None, max_length: int | None = None,
                  images=None) -> Encoded:
    """``encode(sample, for_generation=True)`` for a request, with each image's processed pixels from ``images`` (a
    :class:`qvl.infer.image_cache.ProcessedImages`) where its source came before: a chat client re-sends every image
    of the conversation each turn, and it is then neither decoded nor normalised again. The placeholders are expanded
    here as the processor would (its own grid per image), the text tokenised alone. Without ``images``, or with a
    video in the sample (its frames' timestamps are text the processor writes): :func:`encode`. Equal to it
    (tests/data/test_preprocess.py)."""
    media = sample.media()
    if images is None or not media or any(m.kind != "image" for m in media):
        return encode(sample, processor, budget, max_length, for_generation=True)
    text = render(processor, sample.messages, add_generation_prompt=True)
    pad = processor.image_token
    pieces = text.split(pad)
    if len(pieces) - 1 != len(media):
        raise QvlError(f"template rendered {len(pieces) - 1} image placeholders for {len(media)} images",
                       where=sample.origin or None)
    ip = processor.image_processor
    images_kwargs = processor_kwargs(budget).get("images_kwargs", {})
    settings = f"{type(ip).__name__}{sorted(images_kwargs.items())}"

    def process(source):
        try:
            out = ip(images=[load_image(source)], return_tensors="pt", **images_kwargs)
        except ValueError as e:  # as encode(): an aspect ratio above 200, an image smaller than a patch
            raise QvlError(f"processor rejected the media: {e}", where=sample.origin or None) from None
        return out["pixel_values"], out["image_grid_thw"]

    kept = [images.get_or_make(m.source, settings, lambda m=m: process(m.source)) for m in media]
    expanded = [pieces[0]]
    for (_, grid, _), rest in zip(kept, pieces[1:]):
        expanded.append(pad * (int(grid.prod()) // ip.merge_size ** 2))
        expanded.append(rest)
    input_ids = torch.tensor(processor.tokenizer("".join(expanded))["input_ids"], dtype=torch.long)
    if max_length is not None and len(input_ids) > max_length:
        raise TooLong(len(input_ids), max_length, sample.origin)
    return Encoded(
        input_ids=input_ids, labels=None,
        mm_token_type_ids=(input_ids == processor.image_token_id).long(),
        pixel_values=torch.cat([p for p, _, _ in kept]), image_grid_thw=torch.cat([g for _, g, _ in kept]),
        origin=sample.origin, extra={"media_keys": {"pixel_values": [k for _, _, k in kept]}},
    )


def count_tokens(sample: Sample, processor, budget: VisionBudget | None = None, decoded_videos=None) -> int:
    """Exact token length of ``encode(sample)`` without normalising pixels for images.

    Images: the processor's own patch count for the decoded size. Videos: the processor's
    full expansion (timestamps are text tokens), so this costs a video decode unless
    ``decoded_videos`` ([(frames, metadata)] in prompt order) is given.
    """
    text = render(processor, sample.messages)
    image_pad = processor.image_token
    pieces = text.split(image_pad)
    images = [m for m in sample.media("image")]
    if len(pieces) - 1 != len(images):
        raise QvlError(f"template rendered {len(pieces) - 1} image placeholders for {len(images)} images")
    expanded = [pieces[0]]
    for m, rest in zip(images, pieces[1:]):
        img = load_image(m.source)
        n = image_tokens(processor, budget, img.height, img.width, where=sample.origin or None)
        expanded.append(image_pad * n)
        expanded.append(rest)
    text = "".join(expanded)
    videos = sample.media("video")
    if not videos:
        return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    # Special tokens split BPE pre-tokenisation, so each video's expansion (timestamps + pads) can be
    # counted on its own: total = text without the video pads + the expansion of each pad.
    video_pad = processor.video_token
    total = len(processor.tokenizer(text.replace(video_pad, ""), add_special_tokens=False)["input_ids"])
    if decoded_videos is None:
        _, frames, metas = load_media([Message("user", list(videos))], budget, processor)
    else:
        frames, metas = [f for f, _ in decoded_videos], [m for _, m in decoded_videos]
    videos_kwargs = processor_kwargs(budget)["videos_kwargs"]
    for clip, meta in zip(frames, metas):
        out = processor(text=[video_pad], videos=[clip], video_metadata=[meta], return_tensors="pt",
                        videos_kwargs=videos_kwargs)
        total += int(out["input_ids"].shape[1])
    return total
