"""Vision-encoder outputs kept by content, so a chat turn that re-sends an image does not encode it again.

A chat client sends the whole conversation every turn, images included; without this, every turn ran
the vision tower over every image of the conversation again. Each image (or video) is keyed by a
hash of its preprocessed pixels and grid (:func:`media_keys`, computed off the engine's thread), and
its tower outputs -- the merged embeddings and the DeepStack features -- are kept in an LRU bounded
in bytes and entries.

The packed prefill (``qvl.infer.packed_prefill``, the default) asks :meth:`VisionCache.lookup` for a
call's items and encodes only the missing ones itself. The padded prefill reaches the tower through the
Hugging Face forward, so there (:meth:`VisionCache.attached`) the cache sits in front of the tower module
itself: :meth:`VisionCache.expect` names the keys of the pixel tensor about to be passed, and the tower then
runs only on the items it has not seen, the output the model expects assembled from kept and new parts. A tower
call it was not told about (a dtype copy of the pixels, say) runs as before. Per-item outputs do not depend on
the other items of the call (the tower's attention is per item), so a kept item equals a recomputed one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import OrderedDict

import torch

log = logging.getLogger("qvl.infer")

MEDIA = (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw"))


def item_key(pixel_key: str, thw: list[int], pixels: torch.Tensor) -> str:
    """The content key of one image or video: its pixels (its rows of the pixel tensor) and grid."""
    pixels = pixels.contiguous()
    h = hashlib.sha256(f"{pixel_key}{thw}{pixels.dtype}".encode())
    h.update(pixels.numpy().data)  # hashlib releases the GIL on large buffers
    return h.hexdigest()


def media_keys(enc) -> dict[str, list[str]]:
    """Content keys of each image / video of an Encoded sample: {pixel key: [key per item]}; those its encoder
    already knew (``enc.extra["media_keys"]``, qvl.infer.image_cache) are not computed again."""
    known = enc.extra.get("media_keys", {}) if getattr(enc, "extra", None) else {}
    out = {}
    for pixel_key, grid_key in MEDIA:
        pixels, grid = getattr(enc, pixel_key, None), getattr(enc, grid_key, None)
        if pixels is None or grid is None:
            continue
        if pixel_key in known:
            out[pixel_key] = list(known[pixel_key])
            continue
        keys, start = [], 0
        for thw in grid.tolist():
            n = thw[0] * thw[1] * thw[2]
            keys.append(item_key(pixel_key, thw, pixels[start:start + n]))
            start += n
        out[pixel_key] = keys
    return out


class VisionCache:
    def __init__(self, visual: torch.nn.Module, max_bytes: int, max_items: int = 512):
        self.visual, self.max_bytes, self.max_items = visual, max_bytes, max_items
        self.merge = int(getattr(visual, "spatial_merge_size", 2)) ** 2
        self.entries: OrderedDict[str, tuple[torch.Tensor, list[torch.Tensor]]] = OrderedDict()
        self.bytes = 0
        self.expected: dict[tuple, list[str]] = {}
        self.hits = self.misses = 0
        self.encoded_items = 0  # items the tower actually ran on (tests read it)
        self._output_type = None
        self.enabled = True
        self._original = type(visual).forward.__get__(visual)  # the class's forward, whatever is attached now

    @contextlib.contextmanager
    def attached(self):
        """Route the tower's calls through the cache for the duration (the engine's prefill); the model is left
        as it was afterwards (other users of the same model object never see the cache)."""
        if not self.enabled:
            yield
            return
        self.visual.forward = self._forward  # an instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            self.visual.__dict__.pop("forward", None)
            self.expected.clear()

    @staticmethod
    def _id(pixels: torch.Tensor) -> tuple:
        return pixels.data_ptr(), tuple(pixels.shape), pixels.dtype, pixels.device

    def expect(self, pixels: torch.Tensor, keys: list[str]) -> None:
        """The next tower call on exactly ``pixels`` holds the items ``keys`` (in order)."""
        self.expected[self._id(pixels)] = keys

    def _forward(self, hidden_states, grid_thw=None, **kwargs):
        keys = self.expected.pop(self._id(hidden_states), None) if torch.is_tensor(hidden_states) else None
        if keys is None or grid_thw is None or len(keys) != len(grid_thw):
            return self._original(hidden_states, grid_thw=grid_thw, **kwargs)
        rows = grid_thw.prod(-1).tolist()

        def encode(missing: list[int]):
            if len(missing) == len(keys):
                return self._original(hidden_states, grid_thw=grid_thw, **kwargs)
            starts = [sum(rows[:i]) for i in range(len(rows))]
            pixels = torch.cat([hidden_states[starts[i]:starts[i] + rows[i]] for i in missing])
            return self._original(pixels, grid_thw=grid_thw[missing], **kwargs)

        out = self.lookup(keys, rows, encode)
        return out if out is not None else self._original(hidden_states, grid_thw=grid_thw, **kwargs)

    def lookup(self, keys: list[str], rows: list[int], encode):
        """The tower's output for the items ``keys`` (``rows``: each one's patch count): kept items from here, the
        others from ``encode(indices)`` (the tower's output for just those items, in order), then kept. None where
        the tower's output cannot be kept (the cache turns itself off; the caller runs the tower itself)."""
        missing = [i for i, k in enumerate(keys) if k not in self.entries]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            out = encode(missing)
            if getattr(out, "pooler_output", None) is None or getattr(out, "deepstack_features", None) is None:
                log.warning("vision cache off: the tower's output has no pooler_output/deepstack_features")
                self.enabled = False
                return None
            self._output_type = type(out)
            self.encoded_items += len(missing)
            sizes = [rows[i] // self.merge for i in missing]
            embeds = out.pooler_output.split(sizes)
            deep = [f.split(sizes) for f in out.deepstack_features]
            for j, i in enumerate(missing):
                fresh[keys[i]] = (embeds[j], [d[j] for d in deep])
        parts = [fresh.get(k) or self.entries[k] for k in keys]
        for k, v in fresh.items():
            self._keep(k, v)
        for k in keys:  # this call's items are the most recently used
            if k in self.entries:
                self.entries.move_to_end(k)
        pooled = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        deep = [torch.cat([p[1][layer] for p in parts]) if len(parts) > 1 else parts[0][1][layer]
                for layer in range(len(parts[0][1]))]
        return self._output_type(pooler_output=pooled, deepstack_features=deep)

    def _keep(self, key: str, value) -> None:
        embeds, deep = value
        value = (embeds.clone(), [d.clone() for d in deep])  # not views into the whole call's output
        size = sum(t.numel() * t.element_size() for t in (value[0], *value[1]))
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.entries and (self.bytes > self.max_bytes or len(self.entries) > self.max_items):
            _, (e, d) = self.entries.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in (e, *d))
