"""http(s) media: SSRF protection (private addresses refused by default, on every redirect hop), pinning."""

from __future__ import annotations

import http.server
import threading

import pytest
from serve_helpers import png_bytes

from qvl.serve import media
from qvl.serve.media import MediaResolver
from qvl.serve.schema import ApiError, MediaRef


@pytest.fixture
def web():
    """A tiny HTTP server on 127.0.0.1: /a.png, /to-private (302 to 10.1.2.3), /loop (302 to itself)."""
    seen = []

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Host")))
            if self.path == "/a.png":
                body = png_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            target = {"/to-private": "http://10.1.2.3/a.png", "/to-png": "/a.png", "/loop": "/loop"}[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv.server_address[1], seen
    srv.shutdown()
    srv.server_close()


def fetch(resolver, url):
    return resolver.image(MediaRef("image", url, "messages[0].content[0]"))


def test_private_addresses_refused_by_default(web):
    port, seen = web
    for url in (f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png", "http://10.0.0.7/x.png",
                "http://169.254.169.254/latest/meta-data/", "http://[::1]/x.png", "http://[::ffff:127.0.0.1]/x.png",
                "http://0.0.0.0/x.png"):
        with pytest.raises(ApiError) as e:
            fetch(MediaResolver(), url)
        assert e.value.status == 403 and e.value.code == "private_address_refused", url
    assert seen == []  # refused before connecting


def test_private_addresses_allowed_when_asked(web):
    port, _ = web
    assert fetch(MediaResolver(allow_private=True), f"http://127.0.0.1:{port}/a.png").size == (64, 48)


def test_public_host_is_pinned_and_every_redirect_checked(web, monkeypatch):
    port, seen = web
    monkeypatch.setattr(media, "_blocked", lambda ip: not ip.is_loopback)  # pretend loopback is the internet
    img = fetch(MediaResolver(), f"http://localhost:{port}/to-png")
    assert img.size == (64, 48)
    assert seen == [("/to-png", f"localhost:{port}"), ("/a.png", f"localhost:{port}")]  # Host kept when pinned
    with pytest.raises(ApiError) as e:  # a public URL that redirects to a private address
        fetch(MediaResolver(), f"http://localhost:{port}/to-private")
    assert e.value.code == "private_address_refused"
    with pytest.raises(ApiError) as e:
        fetch(MediaResolver(), f"http://localhost:{port}/loop")
    assert e.value.code == "media_fetch_failed" and "redirects" in e.value.message


def test_unresolvable_host_is_a_400():
    with pytest.raises(ApiError) as e:
        fetch(MediaResolver(), "http://no-such-host.invalid/a.png")
    assert e.value.status == 400 and e.value.code == "media_fetch_failed"


def test_bad_sampling_is_refused_before_fetching(web, serve):
    """An out-of-range setting is a 400 without the server fetching the request's media first."""
    import httpx
    from serve_helpers import ScriptedEngine

    port, seen = web
    server = serve(ScriptedEngine("ok"), allow_private_media_urls=True)
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "scripted", "top_p": 7, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/a.png"}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value"
    assert seen == []
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30, json={
        "model": "scripted", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/a.png"}}]}]})
    assert r.status_code == 200 and seen == [("/a.png", f"127.0.0.1:{port}")]


def test_image_cache_is_bounded_by_pixels(monkeypatch):
    from serve_helpers import data_url

    resolver = MediaResolver()
    monkeypatch.setattr(resolver, "_cache_pixels", 3 * 64 * 48)
    urls = [data_url(png_bytes(color=(i, 0, 0)), "image/png") for i in range(5)]
    for u in urls:
        resolver.image(MediaRef("image", u, "p"))
    assert len(resolver._cache) == 3  # by pixels, not only by count (64 huge images were ~12 GB)
    assert resolver.image(MediaRef("image", urls[-1], "p")) is resolver._cache[next(reversed(resolver._cache))]
