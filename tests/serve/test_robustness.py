"""`qvl serve` (the real CLI, its own process, the tiny model on the CPU) under hostile and long load.

* fuzz: 30 kinds of bad or unusual requests, each sent several times, concurrently with streaming
  clients of which half go away after a few tokens: no response is a 5xx, every stream that is read
  to the end completes, and the server still answers afterwards;
* soak: 1,000 requests (distinct images, streaming and not): none fails, and the server's resident
  memory after them is within 10 % of what it was after the first 100.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json

import httpx
import pytest
from serve_helpers import make_mp4, png_bytes

from qvl.serve.loadgen import stream_chat
from qvl.serve.process import ServerProcess

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(["--model", str(tiny_model_dir), "--cpu-only", "--served-model-name", MODEL,
                        "--max-batch-size", "8", "--kv-cache-gib", "0.25", "--max-model-len", "2048"],
                       log_path=log, startup_timeout=300) as s:
        yield s


def _image(fmt: str, mode: str = "RGB", size=(48, 40), **save) -> bytes:
    from PIL import Image

    img = Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 7)
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def _animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("P", (40, 40), i * 40) for i in range(4)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _with_image(url: str, kind: str = "image_url") -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": kind, kind: {"url": url}}, {"type": "text", "text": "what is it?"}]}]}


def _text(text="hi", **extra) -> dict:
    return {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": text}], **extra}


def bad_requests(tmp_path) -> dict[str, bytes]:
    """Kind -> raw request body. Some kinds are unusual but valid (palette, animated, 16-bit): they may be
    answered 200; none may be answered 5xx."""
    from PIL import Image

    png = png_bytes()
    mp4 = open(make_mp4(tmp_path / "clip.mp4"), "rb").read()
    cmyk = io.BytesIO()
    Image.new("CMYK", (48, 40), (0, 120, 200, 10)).save(cmyk, "JPEG")
    i16 = io.BytesIO()
    Image.new("I;16", (48, 40), 40000).save(i16, "PNG")
    j = json.dumps
    kinds = {
        "lone_surrogate_text": b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
        "invalid_utf8_body": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}',
        "nan_temperature": b'{"model": "tiny", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}',
        "infinite_top_p": b'{"model": "tiny", "top_p": Infinity, "messages": [{"role": "user", "content": "x"}]}',
        "huge_temperature": j(_text(temperature=1e308)).encode(),
        "huge_max_tokens": j(_text(max_tokens=10**18)).encode(),
        "negative_max_tokens": j(_text(max_tokens=-5)).encode(),
        "seed_over_64_bits": j(_text(seed=2**70)).encode(),
        "integer_of_5000_digits": b'{"model": "tiny", "seed": ' + b"9" * 5000 + b"}",
        "deep_json": b"[" * 50_000 + b"]" * 50_000,
        "deep_json_in_field": j(_text(metadata=None)).encode().replace(b"null", b"[" * 5000 + b"]" * 5000),
        "empty_body": b"",
        "body_is_a_list": b"[1, 2, 3]",
        "messages_is_a_string": j({"model": MODEL, "messages": "hello"}).encode(),
        "bad_base64": j(_with_image("data:image/png;base64,@@@not*base64@@@")).encode(),
        "data_url_not_base64": j(_with_image("data:image/png,rawbytes")).encode(),
        "zero_byte_image": j(_with_image("data:image/png;base64,")).encode(),
        "text_sent_as_image": j(_with_image(_url(b"hello, I am not a picture"))).encode(),
        "truncated_png": j(_with_image(_url(png[: len(png) // 2]))).encode(),
        "image_1x1": j(_with_image(_url(png_bytes(1, 1)))).encode(),
        "image_10000x1": j(_with_image(_url(png_bytes(10000, 1)))).encode(),
        "cmyk_jpeg": j(_with_image(_url(cmyk.getvalue(), "image/jpeg"))).encode(),
        "png_16_bit": j(_with_image(_url(i16.getvalue()))).encode(),
        "palette_png": j(_with_image(_url(_image("PNG", "P")))).encode(),
        "animated_gif": j(_with_image(_url(_animated_gif(), "image/gif"))).encode(),
        "truncated_video": j(_with_image(_url(mp4[: len(mp4) // 3], "video/mp4"), "video_url")).encode(),
        "garbage_video": j(_with_image(_url(b"\x00\x01garbage" * 100, "video/mp4"), "video_url")).encode(),
        "image_as_video": j(_with_image(_url(png, "image/png"), "video_url")).encode(),
        "ftp_url": j(_with_image("ftp://example.com/a.png")).encode(),
        "unknown_part_type": j({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "audio", "audio": "x"}]}]}).encode(),
        "stop_list_too_long": j(_text(stop=[str(i) for i in range(50)])).encode(),
        "unknown_model": j({**_text(), "model": "gpt-9"}).encode(),
        "n_two": j(_text(n=2)).encode(),
        "prompt_over_the_context": j(_text("word " * 5000)).encode(),
    }
    return kinds


async def _fuzz(server, kinds: dict[str, bytes], repeats: int, good: int, short: int):
    url = server.url + "/v1/chat/completions"
    statuses: dict[str, list[int]] = {k: [] for k in kinds}
    good_body = {"model": MODEL, "max_tokens": 12, "temperature": 0,
                 "messages": [{"role": "user", "content": [
                     {"type": "image_url", "image_url": {"url": _url(png_bytes(64, 48))}},
                     {"type": "text", "text": "describe"}]}]}
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)) as client:
        async def bad(kind, body, stream):
            if stream and body[:1] == b"{":  # the same body as a streaming request
                body = body[:-1] + b', "stream": true}' if body.rstrip().endswith(b"}") else body
            r = await client.post(url, content=body, headers={"content-type": "application/json"})
            statuses[kind].append(r.status_code)
            if r.status_code >= 400:  # an OpenAI error body, always
                err = r.json()["error"]
                assert err["message"] and err["code"], (kind, r.text)

        tasks = [bad(k, b, i % 2 == 1) for i in range(repeats) for k, b in kinds.items()]
        tasks += [stream_chat(client, url, good_body) for _ in range(good)]
        tasks += [stream_chat(client, url, {**good_body, "max_tokens": 400, "ignore_eos": True},
                              disconnect_after=2) for _ in range(short)]
        results = await asyncio.gather(*tasks)
    return statuses, [r for r in results if r is not None]


def _parsed(raw: bytes):
    from qvl.serve.schema import ApiError, parse_json

    try:
        return "body", parse_json(raw)
    except ApiError as e:
        return "error", e.status, e.code, e.param, e.message


def test_the_fast_json_parser_reads_every_body_as_json_loads_does(tmp_path, monkeypatch):
    """The body goes through pydantic-core's parser first: the same value or the same error as json.loads' path for
    each fuzz body, for valid bodies, and for what only json.loads accepts (a lone surrogate kept and reported,
    a UTF-16 body, surrogates sent as UTF-8 bytes)."""
    from qvl.serve import schema

    kinds = bad_requests(tmp_path)
    kinds.update({
        "emoji_pair": '{"model": "tiny", "messages": [{"role": "user", "content": "\\ud83d\\ude00 \u00e9"}]}'.encode(),
        "surrogate_key": b'{"model": "tiny", "\\ud800": 1, "messages": []}',
        "utf16_body": json.dumps(_text()).encode("utf-16"),
        "cesu_surrogate": b'{"model": "tiny", "messages": [{"role": "user", "content": "a\xed\xa0\x80"}]}',
        "numbers": b'{"a": [1, -0, 2.5, 1E3, 1e999, 12345678901234567890123], "b": null, "a": 7}',
        "image_turn": json.dumps(_with_image(_url(png_bytes(64, 48)))).encode(),
        "null": b"null",
    })
    assert schema._fast_loads(b'{"a": [1]}') == {"a": [1]}  # the fast parser is installed here (fastapi's)
    fast = {kind: _parsed(raw) for kind, raw in kinds.items()}
    monkeypatch.setattr(schema, "_fast_loads", lambda raw: schema._REFUSED)
    slow = {kind: _parsed(raw) for kind, raw in kinds.items()}
    for kind in kinds:  # repr: nan != nan, and 1 == 1.0 == True
        assert repr(fast[kind]) == repr(slow[kind]), kind
    assert fast["lone_surrogate_text"][:3] == ("error", 400, "invalid_unicode")
    assert fast["emoji_pair"][1]["messages"][0]["content"] == "\U0001F600 \u00e9"


def test_fuzz_no_5xx_streams_complete_server_alive(server, tmp_path):
    kinds = bad_requests(tmp_path)
    assert len(kinds) >= 25
    statuses, streams = asyncio.run(_fuzz(server, kinds, repeats=2, good=16, short=16))
    five = {k: s for k, s in statuses.items() if any(x >= 500 for x in s)}
    assert not five, f"5xx answers: {five}\n{server.tail()}"
    refused = {k for k, s in statuses.items() if all(400 <= x < 500 for x in s)}
    must_refuse = set(kinds) - {"palette_png", "animated_gif", "png_16_bit", "cmyk_jpeg", "huge_max_tokens"}
    assert must_refuse <= refused, {k: statuses[k] for k in must_refuse - refused}
    assert statuses["lone_surrogate_text"][0] == 400
    complete = streams[:16]
    assert all(r.ok and r.finish_reason == "length" and r.completion_tokens == 12 for r in complete), \
        [(r.status, r.error, r.finish_reason) for r in complete if not r.ok]
    assert len({r.text for r in complete}) == 1  # greedy: the same answer however busy the server was
    assert all(r.ok and len(r.token_times) >= 2 for r in streams[16:])  # went away early, after 2 tokens
    assert server.alive()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", json=_text(), timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


async def _soak(server, n: int, concurrency: int, on_progress):
    import numpy as np
    from PIL import Image

    url = server.url + "/v1/chat/completions"
    rng = np.random.default_rng(0)
    failures, done = [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async with httpx.AsyncClient(timeout=120) as client:
        async def worker():
            nonlocal done
            while not queue.empty():
                i = queue.get_nowait()
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (24 + i % 16, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": _url(buf.getvalue())}},
                    {"type": "text", "text": f"request {i}"}]}]}
                if i % 2:
                    r = await stream_chat(client, url, body)
                    ok = r.ok
                else:
                    resp = await client.post(url, json=body)
                    ok = resp.status_code == 200
                if not ok:
                    failures.append(i)
                done += 1
                on_progress(done)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


@pytest.mark.slow
def test_soak_1000_requests_memory_flat(server):
    rss = {}

    def progress(done):
        if done in (100, 1000):
            rss[done] = server.rss_bytes()

    failures = asyncio.run(_soak(server, 1000, concurrency=8, on_progress=progress))
    assert not failures, failures[:10]
    assert server.alive()
    growth = rss[1000] / rss[100]
    print(f"server RSS after 100 requests {rss[100] / 2**20:.0f} MiB, after 1000 {rss[1000] / 2**20:.0f} MiB "
          f"({growth:.3f}x)")
    assert growth <= 1.10, f"RSS grew {growth:.2f}x between request 100 and 1000"
