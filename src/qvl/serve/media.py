"""Turning the media URLs of a request into what the data pipeline reads.

* ``data:`` URLs are decoded here (size-checked); images become PIL images, videos a temp file.
* ``http(s)://`` URLs are fetched with a timeout and a byte limit (the data pipeline refuses them).
  Hosts that resolve to loopback, private, link-local (cloud metadata) or other non-public addresses
  are refused unless ``--allow-private-media-urls``: otherwise anyone who can reach the server could
  make it read internal services (SSRF). Every redirect hop is checked, and the connection goes to
  the address that was checked (no second DNS lookup to rebind).
* Images are refused above ``MAX_IMAGE_PIXELS`` before they are decoded (a small PNG can hold a
  huge blank canvas).
* Local paths (``/x``, ``file://``) are refused unless they resolve inside ``--allowed-media-dir``:
  a server must not read arbitrary files for whoever can reach it.

Decoded images are cached by URL digest, so a multi-turn chat that re-sends the same image does
not decode it again on every turn.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import socket
import threading
from collections import OrderedDict
from pathlib import Path

from qvl.infer.image_cache import SOURCE_INFO
from qvl.serve.schema import ApiError, MediaRef, bad

VIDEO_SUFFIX = {"video/mp4": ".mp4", "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv",
                "video/avi": ".avi", "video/x-msvideo": ".avi", "video/mpeg": ".mpeg"}
MAX_REDIRECTS = 5
MAX_IMAGE_PIXELS = 64 * 2**20  # 64 Mpx (8192 x 8192): far above what the processor keeps, far below a bomb
CACHE_PIXELS = 256 * 2**20  # decoded images kept for later turns: at most ~768 MB of RGB, not 64 x 192 MB


def _blocked(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Addresses a server must not fetch for its clients: anything that is not public unicast."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


class MediaResolver:
    def __init__(self, allowed_dir: str | Path | None = None, max_bytes: int = 32 * 2**20,
                 allow_remote: bool = True, fetch_timeout: float = 10.0, cache_items: int = 64,
                 allow_private: bool = False):
        self.allowed_dir = Path(allowed_dir).expanduser().resolve() if allowed_dir else None
        self.max_bytes, self.allow_remote, self.fetch_timeout = max_bytes, allow_remote, fetch_timeout
        self.allow_private = allow_private
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_items = cache_items
        self._cache_pixels = CACHE_PIXELS
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

    def _public_address(self, url, ref: MediaRef) -> str:
        """The address to connect to for ``url``'s host; 403 when it (or any address of the host) is private."""
        try:
            infos = socket.getaddrinfo(url.host, url.port or (443 if url.scheme == "https" else 80),
                                       type=socket.SOCK_STREAM)
            addrs = [info[4][0] for info in infos]
            ips = [ipaddress.ip_address(a.split("%")[0]) for a in addrs]
        except (OSError, UnicodeError, ValueError):
            raise bad(f"'{ref.param}': cannot resolve the host of {ref.url}", param=ref.param,
                      code="media_fetch_failed") from None
        if not ips or any(_blocked(ip) for ip in ips):
            raise bad(f"'{ref.param}': {url.host} is a private, loopback or link-local address; this server only "
                      "fetches media from public addresses (--allow-private-media-urls to allow)", param=ref.param,
                      code="private_address_refused", status=403)
        return addrs[0]

    def _fetch(self, ref: MediaRef) -> tuple[bytes, str]:
        if not self.allow_remote:
            raise bad(f"'{ref.param}': remote URLs are disabled on this server", param=ref.param,
                      code="remote_media_disabled")
        import httpx

        try:
            url = httpx.URL(ref.url)
            with httpx.Client(timeout=self.fetch_timeout, follow_redirects=False) as client:
                for _ in range(MAX_REDIRECTS + 1):
                    if url.scheme not in ("http", "https") or not url.host:
                        raise bad(f"'{ref.param}': {ref.url} redirects to {url}, which is not an http(s) URL",
                                  param=ref.param, code="media_fetch_failed")
                    if self.allow_private:
                        req = client.build_request("GET", url)
                    else:  # connect to the checked address; Host header and TLS name stay the URL's
                        ip = self._public_address(url, ref)
                        req = client.build_request(
                            "GET", url.copy_with(host=ip), headers={"Host": url.netloc.decode("ascii")},
                            extensions={"sni_hostname": url.host} if url.scheme == "https" else {})
                    r = client.send(req, stream=True)
                    try:
                        if r.is_redirect and "location" in r.headers:
                            url = url.join(r.headers["location"])
                            continue
                        return self._read(r, ref)
                    finally:
                        r.close()
                raise bad(f"'{ref.param}': {ref.url} redirects more than {MAX_REDIRECTS} times", param=ref.param,
                          code="media_fetch_failed")
        except httpx.HTTPError as e:
            raise bad(f"'{ref.param}': cannot fetch {ref.url}: {type(e).__name__}", param=ref.param,
                      code="media_fetch_failed") from None
        except httpx.InvalidURL:
            raise bad(f"'{ref.param}': {ref.url} is not a valid URL", param=ref.param, code="invalid_media") from None

    def _read(self, r, ref: MediaRef) -> tuple[bytes, str]:
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

    def _local(self, ref: MediaRef) -> Path:
        path = ref.url.removeprefix("file://")
        if self.allowed_dir is None:
            raise bad(f"'{ref.param}': local file paths are refused by this server", param=ref.param,
                      code="local_path_refused", status=403)
        if "\x00" in path:
            raise bad(f"'{ref.param}': a file path cannot hold a NUL character", param=ref.param,
                      code="invalid_media")
        try:
            p = Path(path).expanduser()
        except RuntimeError:  # ~name of a user that does not exist
            raise bad(f"'{ref.param}': {path} does not exist", param=ref.param, code="invalid_media") from None
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
        _check_pixels(data, path, ref)
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
        img.info[SOURCE_INFO] = key  # the engine keeps its processed pixels by this (qvl.infer.image_cache)
        with self._lock:
            self._cache[key] = img
            while len(self._cache) > self._cache_items or (
                    len(self._cache) > 1 and sum(i.width * i.height for i in self._cache.values()) > self._cache_pixels):
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
        except QvlError as e:  # the reader names the server's temporary copy: the client knows it by its param
            what = e.what.replace(str(out), "the video")
            raise bad(f"'{ref.param}': unsupported video ({what})", param=ref.param,
                      code="unsupported_video") from None
        if info.total_frames <= 0:
            raise bad(f"'{ref.param}': unsupported video (no frames)", param=ref.param, code="unsupported_video")
        return str(out)


def _check_pixels(data: bytes | None, path: Path | None, ref: MediaRef) -> None:
    """Refuse an image above MAX_IMAGE_PIXELS from its header, before decoding it."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data) if data is not None else path) as im:
            w, h = im.size
    except Exception:  # noqa: BLE001 - unreadable: load_image reports it with the reason
        return
    if w * h > MAX_IMAGE_PIXELS:
        raise bad(f"'{ref.param}': image is {w}x{h} pixels; the limit is {MAX_IMAGE_PIXELS // 2**20} Mpx",
                  param=ref.param, code="image_too_large")


def _check_size(img, ref: MediaRef) -> None:
    w, h = img.size
    if w < 2 or h < 2:
        raise bad(f"'{ref.param}': image is {w}x{h} pixels; it must be at least 2x2", param=ref.param,
                  code="invalid_image")
    if max(w, h) / min(w, h) > 200:  # the Qwen processor's limit, as a clear 400 instead of a stack trace
        raise bad(f"'{ref.param}': image aspect ratio {w}x{h} is above 200", param=ref.param, code="invalid_image")
