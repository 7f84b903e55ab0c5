"""Processed images kept by source, so a chat turn that re-sends an image does not decode and normalise it again.

A chat client sends every image of the conversation with each turn (a data: URL, or a path the server may read).
Without this, each turn decoded every image and ran the image processor over it (resize, normalise, patchify:
~40 ms for a 1024x1024 PNG with the tiny model's 512x512 budget on a 2-core CPU, more at the 8B processor's larger
budget) before the prefix and vision caches could skip anything. Each image is keyed by a hash of its source as
sent (a data URL's text; a file's path, size and modification time; for an image the server decoded, the key it
gave it, :data:`SOURCE_INFO`) and the processor settings; what is kept is
the image processor's output (pixels, grid) and the pixels' content key (:func:`qvl.infer.vision_cache.item_key`,
so the vision cache and prefix reuse need not hash them again). An LRU bounded in bytes and images; other in-memory images and
bytes are not kept. Safe to call from several preprocessing threads.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

# (pixels, grid_thw) of one image -> as kept: (pixels, grid_thw, content key)
Processed = tuple[torch.Tensor, torch.Tensor, str]


# where a decoded image carries the key of what it was decoded from (qvl.serve.media sets it: the server decodes each
# URL once and hands the engine the same image for a re-sent one)
SOURCE_INFO = "qvl_source_key"


def source_key(source, settings: str) -> str | None:
    """A key for an image's source as sent, or None where there is none worth keeping (an in-memory image that does
    not say where it came from)."""
    h = hashlib.sha256(settings.encode())
    info = getattr(source, "info", None)
    if isinstance(info, dict) and info.get(SOURCE_INFO):
        h.update(f"decoded\0{info[SOURCE_INFO]}".encode())
        return h.hexdigest()
    if not isinstance(source, str):
        return None
    if source.startswith("data:"):
        h.update(source.encode())  # hashlib releases the GIL on large buffers
        return h.hexdigest()
    path = source.removeprefix("file://")
    try:
        st = os.stat(path)
    except OSError:
        return None  # the loader says what is wrong with it
    h.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


class ProcessedImages:
    def __init__(self, max_bytes: int, max_items: int = 64):
        self.max_bytes, self.max_items = max_bytes, max_items
        self.entries: OrderedDict[str, Processed] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def get_or_make(self, source, settings: str, make: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Processed:
        """The processed image for ``source`` under ``settings``: kept, or ``make()``'s (pixels, grid) with its content
        key, kept for next time when it has a source key and fits."""
        from qvl.infer.vision_cache import item_key

        key = source_key(source, settings)
        if key is not None:
            with self._lock:
                kept = self.entries.get(key)
                if kept is not None:
                    self.entries.move_to_end(key)
                    self.hits += 1
                    return kept
        pixels, grid = make()
        made = (pixels, grid, item_key("pixel_values", grid[0].tolist(), pixels))
        size = pixels.numel() * pixels.element_size()
        with self._lock:
            self.misses += 1
            if key is not None and size <= self.max_bytes and key not in self.entries:
                self.entries[key] = made
                self.bytes += size
                while self.bytes > self.max_bytes or len(self.entries) > self.max_items:
                    _, (old, _, _) = self.entries.popitem(last=False)
                    self.bytes -= old.numel() * old.element_size()
        return made
