"""Batches of Encoded samples: padded rows the model accepts for loss and for generation."""

from __future__ import annotations

import torch

from qvl.data.preprocess import IGNORE_INDEX, Encoded


def _cat(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present, dim=0) if present else None


def collate(batch: list[Encoded], pad_id: int, padding_side: str = "right") -> dict:
    """Pad to the longest row. Right padding for training, left for batched generation.

    Returns input_ids, attention_mask, mm_token_type_ids (required by get_rope_index whenever
    media are present), labels (if every sample has them) and the concatenated vision inputs.
    """
    if not batch:
        raise ValueError("empty batch")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    longest = max(len(e) for e in batch)
    n = len(batch)
    input_ids = torch.full((n, longest), pad_id, dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    types = torch.zeros((n, longest), dtype=torch.long)
    with_labels = all(e.labels is not None for e in batch)
    labels = torch.full((n, longest), IGNORE_INDEX, dtype=torch.long) if with_labels else None
    for row, e in enumerate(batch):
        length = len(e)
        sl = slice(0, length) if padding_side == "right" else slice(longest - length, longest)
        input_ids[row, sl] = e.input_ids
        attention[row, sl] = 1
        types[row, sl] = e.mm_token_type_ids
        if labels is not None:
            labels[row, sl] = e.labels
    out = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": types}
    if labels is not None:
        out["labels"] = labels
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        value = _cat([getattr(e, key) for e in batch])
        if value is not None:
            out[key] = value
    return out
