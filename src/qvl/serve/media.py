"""Turning the media URLs of a request into what the data pipeline reads.

* ``data:`` URLs are decoded here (size-checked); images become PIL images, videos a temp file.
* ``http(s)://`` URLs are fetched with a timeout and a byte limit (the data pipeline refuses them).
* Local paths (``/x``, ``file://``) are refused unless they resolve inside ``--allowed-media-dir``:
  a server must not read arbitrary files for whoever can reach it.

Decoded images are cached by URL digest, so a multi-turn chat that re-sends the same image does
not decode it again on every turn.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

from qvl.serve.schema import ApiError, MediaRef, bad

VIDEO_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
                "video/avi": ".avi", "video/x-msvideo": ".avi", "video/mpeg": ".mpeg"}


class MediaResolver:
    def __init__(self, allowed_dir: str | Path | None = None, max_bytes: int = 32 * 2**20,
                 allow_remote: bool = True, fetch_timeout: float = 10.0, cache_items: int = 64):
        self.allowed_dir = Path(allowed_dir).expanduser().resolve() if allowed_dir else None
        self.max_bytes, self.allow_remote, self.fetch_timeout = max_bytes, allow_remote, fetch_timeout
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_items = cache_items
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- bytes from a URL
    def _data_url(self, ref: MediaRef) -> tuple[bytes, str]:
        head, _, payload = ref.url.partition(",")
        if not payload or ";base64" not in head:
            raise bad(f"'{ref.param}': data URL must be base64 (data:<mime>;base64,...)", param=ref.param,
                      code="invalid_media")
        if len(payload) * 3 // 4 > self.max_bytes:
            raise bad(f"'{ref.param}': {ref.kind} is larger than {self.max_bytes // 2**20} MiB", param=ref.param,
                      code="media_too_large", status=413)
        try:
            data = base64.b64decode(payload, validate=False)
        except (binascii.Error, ValueError):
            raise bad(f"'{ref.param}': data URL is not valid base64", param=ref.param, code="invalid_media") from None
        return data, head[5:].split(";")[0].lower()

    def _fetch(self, ref: MediaRef) -> tuple[bytes, str]:
        if not self.allow_remote:
            raise bad(f"'{ref.param}': remote URLs are disabled on this server", param=ref.param,
                      code="remote_media_disabled")
        import httpx

        try:
            with httpx.stream("GET", ref.url, timeout=self.fetch_timeout, follow_redirects=True) as r:
                if r.status_code != 200:
                    raise bad(f"'{ref.param}': fetching {ref.url} gave HTTP {r.status_code}", param=ref.param,
                              code="media_fetch_failed")
                chunks, total = [], 0
                for chunk in r.iter_bytes():
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise bad(f"'{ref.param}': {ref.url} is larger than {self.max_bytes // 2**20} MiB",
                                  param=ref.param, code="media_too_large", status=413)
                    chunks.append(chunk)
                return b"".join(chunks), r.headers.get("content-type", "").split(";")[0].lower()
        except httpx.HTTPError as e:
            raise bad(f"'{ref.param}': cannot fetch {ref.url}: {type(e).__name__}", param=ref.param,
                      code="media_fetch_failed") from None

    def _local(self, ref: MediaRef) -> Path:
        path = ref.url.removeprefix("file://")
        if self.allowed_dir is None:
            raise bad(f"'{ref.param}': local file paths are refused by this server", param=ref.param,
                      code="local_path_refused", status=403)
        p = Path(path).expanduser()
        p = (self.allowed_dir / p if not p.is_absolute() else p).resolve()
        if not p.is_relative_to(self.allowed_dir):
            raise bad(f"'{ref.param}': {path} is outside the allowed media folder", param=ref.param,
                      code="local_path_refused", status=403)
        if not p.is_file():
            raise bad(f"'{ref.param}': {path} does not exist", param=ref.param, code="invalid_media")
        return p

    def _bytes(self, ref: MediaRef) -> tuple[bytes | None, str, Path | None]:
        if ref.url.startswith("data:"):
            return (*self._data_url(ref), None)
        if ref.url.startswith(("http://", "https://")):
            return (*self._fetch(ref), None)
        return None, "", self._local(ref)

    # ----------------------------------------------------------------- what the pipeline reads
    def image(self, ref: MediaRef):
        from qvl.data.media import load_image
        from qvl.errors import QvlError

        key = hashlib.sha1(ref.url.encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data, _, path = self._bytes(ref)
        try:
            img = load_image(data if data is not None else str(path))
            _check_size(img, ref)
        except QvlError as e:
            raise bad(f"'{ref.param}': unreadable image ({e.what})", param=ref.param, code="invalid_image") from None
        except ApiError:
            raise
        except Exception as e:  # PIL raises many types for hostile input
            raise bad(f"'{ref.param}': unreadable image ({type(e).__name__})", param=ref.param,
                      code="invalid_image") from None
        with self._lock:
            self._cache[key] = img
            while len(self._cache) > self._cache_items:
                self._cache.popitem(last=False)
        return img

    def video(self, ref: MediaRef, tmpdir: Path) -> str:
        data, mime, path = self._bytes(ref)
        if path is not None:
            return str(path)
        if mime and not (mime.startswith("video/") or mime == "application/octet-stream"):
            raise bad(f"'{ref.param}': {mime} is not a video type", param=ref.param, code="unsupported_video")
        out = Path(tmpdir) / f"video{len(list(Path(tmpdir).iterdir()))}{VIDEO_SUFFIX.get(mime, '.bin')}"
        out.write_bytes(data)
        from qvl.data.media import probe_video
        from qvl.errors import QvlError

        try:
            info = probe_video(str(out))
        except QvlError as e:
            raise bad(f"'{ref.param}': unsupported video ({e.what})", param=ref.param,
                      code="unsupported_video") from None
        if info.total_frames <= 0:
            raise bad(f"'{ref.param}': unsupported video (no frames)", param=ref.param, code="unsupported_video")
        return str(out)


def _check_size(img, ref: MediaRef) -> None:
    w, h = img.size
    if w < 2 or h < 2:
        raise bad(f"'{ref.param}': image is {w}x{h} pixels; it must be at least 2x2", param=ref.param,
                  code="invalid_image")
    if max(w, h) / min(w, h) > 200:  # the Qwen processor's limit, as a clear 400 instead of a stack trace
        raise bad(f"'{ref.param}': image aspect ratio {w}x{h} is above 200", param=ref.param, code="invalid_image")
