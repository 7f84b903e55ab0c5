"""Qwen's special tokens: their order and the official ids. The one place these are written down.

Code that needs an id at run time reads it from the loaded tokenizer (``token_ids(tok)``), never
from the constants here: the tiny model has its own, smaller ids. The constants are used to
build tokenizers whose ids match the official checkpoints and to check that they do.
"""

from __future__ import annotations

from dataclasses import dataclass

# Regular (BPE) vocabulary size of the official Qwen2/2.5/3 tokenizer: the first added token's id.
OFFICIAL_FIRST_ADDED_ID = 151643

# Added tokens in Qwen's order. (text, special): special tokens are skipped when decoding with
# skip_special_tokens; the others (tool and think markers) are ordinary added tokens.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

OFFICIAL_IDS: dict[str, int] = {text: OFFICIAL_FIRST_ADDED_ID + i for i, (text, _) in enumerate(ADDED_TOKENS)}

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
THINK_START = "<think>"
THINK_END = "</think>"

# Tags users write in the official fine-tuning format.
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass(frozen=True)
class TokenIds:
    """The ids the pipeline needs, read from a tokenizer."""

    im_start: int
    im_end: int
    endoftext: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int
    pad: int
    assistant_header: tuple[int, ...]  # ids of "<|im_start|>assistant\n"


def token_ids(tokenizer) -> TokenIds:
    def one(text: str) -> int:
        ids = tokenizer.convert_tokens_to_ids(text)
        if ids is None or ids == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {text!r} token: is this a Qwen3-VL tokenizer?")
        return int(ids)

    header = tuple(tokenizer.encode(f"{IM_START}assistant\n", add_special_tokens=False))
    pad = tokenizer.pad_token_id
    return TokenIds(
        im_start=one(IM_START),
        im_end=one(IM_END),
        endoftext=one(ENDOFTEXT),
        vision_start=one(VISION_START),
        vision_end=one(VISION_END),
        image_pad=one(IMAGE_PAD),
        video_pad=one(VIDEO_PAD),
        pad=int(pad) if pad is not None else one(ENDOFTEXT),
        assistant_header=header,
    )
