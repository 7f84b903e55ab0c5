"""qvl.infer.image_cache: processed images kept by their source as sent, bounded in bytes."""

from __future__ import annotations

import os

import torch
from PIL import Image

from qvl.infer.image_cache import SOURCE_INFO, ProcessedImages, source_key


def test_source_keys_follow_what_was_sent(tmp_path):
    a = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(a)
    assert source_key("data:image/png;base64,AAAA", "s") == source_key("data:image/png;base64,AAAA", "s")
    assert source_key("data:image/png;base64,AAAA", "s") != source_key("data:image/png;base64,AAAB", "s")
    assert source_key("data:image/png;base64,AAAA", "s") != source_key("data:image/png;base64,AAAA", "other settings")
    before = source_key(str(a), "s")
    assert before == source_key(f"file://{a}", "s")
    os.utime(a, ns=(1, 1))  # the same path, changed
    assert source_key(str(a), "s") != before
    assert source_key(str(tmp_path / "missing.png"), "s") is None
    decoded = Image.new("RGB", (8, 8))
    assert source_key(decoded, "s") is None and source_key(b"png bytes", "s") is None
    decoded.info[SOURCE_INFO] = "url-hash"  # as the server marks what it decoded
    again = Image.new("RGB", (8, 8))  # decoded again from the same URL
    again.info[SOURCE_INFO] = "url-hash"
    assert source_key(decoded, "s") is not None and source_key(again, "s") == source_key(decoded, "s")


def test_kept_until_the_bytes_run_out():
    cache = ProcessedImages(max_bytes=3 * 4 * 16)  # three 4 x 4 fp32 images
    made = []

    def make(i):
        def f():
            made.append(i)
            return torch.full((4, 4), float(i)), torch.tensor([[1, 2, 2]])
        return f

    urls = [f"data:image/png;base64,{i}" for i in range(4)]
    first = [cache.get_or_make(u, "s", make(i)) for i, u in enumerate(urls)]  # the 4th evicts the 1st
    again = cache.get_or_make(urls[3], "s", make(3))
    assert again is first[3] and made == [0, 1, 2, 3] and cache.bytes == 3 * 64
    cache.get_or_make(urls[0], "s", make(0))  # evicted: made again
    assert made == [0, 1, 2, 3, 0] and (cache.hits, cache.misses) == (1, 5)
    pixels, grid, key = first[1]
    assert isinstance(key, str) and len(key) == 64 and torch.equal(pixels, torch.full((4, 4), 1.0))
    cache.get_or_make(Image.new("RGB", (2, 2)), "s", make(9))  # no source key: made, not kept
    assert made[-1] == 9 and len(cache.entries) == 3
    few = ProcessedImages(max_bytes=2**20, max_items=2)
    for i, u in enumerate(urls):
        few.get_or_make(u, "s", make(i))
    assert list(few.entries) == [source_key(u, "s") for u in urls[2:]]
