"""The OpenAI-compatible API against the tiny model, through the official `openai` client."""

from __future__ import annotations

import json
import threading

import httpx
import pytest
from serve_helpers import ScriptedEngine, data_url, make_mp4, png_bytes

openai = pytest.importorskip("openai")


def client(server, key="none"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=60, max_retries=0)


def image_message(text="What is in the picture?", n=1):
    parts = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png")}} for _ in range(n)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def test_models(tiny_server):
    models = client(tiny_server).models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_image_non_stream(tiny_server):
    r = client(tiny_server).chat.completions.create(model="tiny", messages=image_message(), max_tokens=6, seed=1)
    assert r.object == "chat.completion"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10  # the image expanded into visual tokens
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_image_stream(tiny_server):
    stream = client(tiny_server).chat.completions.create(
        model="tiny", messages=image_message(), max_tokens=12, stream=True, stream_options={"include_usage": True},
        temperature=0)
    pieces, finish, usage = [], None, None
    for ev in stream:
        if ev.usage:
            usage = ev.usage
        for ch in ev.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            finish = ch.finish_reason or finish
    assert len(pieces) >= 3  # token by token, not one final blob
    assert finish == "length" and usage.completion_tokens == 12
    # the same greedy request without streaming gives the same text
    r = client(tiny_server).chat.completions.create(model="tiny", messages=image_message(), max_tokens=12,
                                                    temperature=0)
    assert r.choices[0].message.content == "".join(pieces)


def test_preprocess_workers_answer_as_the_server_process(tiny_engine, serve, tmp_path):
    """--preprocess-workers: requests prepared in worker processes (qvl.infer.prepare_pool) get the same greedy answers,
    images and videos, streamed or not."""
    def video_message(data: bytes):
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": data_url(data, "video/mp4")}},
                                             {"type": "text", "text": "What happens?"}]}]

    with open(make_mp4(tmp_path / "clip.mp4"), "rb") as f:
        mp4 = f.read()
    video = video_message(mp4)
    plain, pooled = serve(tiny_engine), serve(tiny_engine, preprocess_workers=1)
    assert pooled.app.state.prepare_pool.workers == 1 and plain.app.state.prepare_pool is None

    def answers(server):
        c, out = client(server), []
        for messages in (image_message(), video):
            r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
            out.append((r.choices[0].message.content, r.usage.prompt_tokens))
            out.append("".join(ch.delta.content or "" for ev in c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True) for ch in ev.choices))
        return out

    assert answers(pooled) == answers(plain)
    errors = []
    for server in (plain, pooled):  # a clip its decoder fails on: the same 400
        r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 3, "messages": video_message(mp4[: len(mp4) // 3])})
        errors.append((r.status_code, r.json()["error"]["code"]))
    assert errors[0] == errors[1] and errors[0][0] == 400, errors


@pytest.mark.parametrize("stream", [False, True])
def test_video(tiny_server, tmp_path, stream):
    mp4 = make_mp4(tmp_path / "clip.mp4")
    with open(mp4, "rb") as f:
        url = data_url(f.read(), "video/mp4")
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]
    c = client(tiny_server)
    if stream:
        text = "".join(ch.delta.content or "" for ev in c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=5, stream=True) for ch in ev.choices)
    else:
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
        text = r.choices[0].message.content
        assert r.usage.prompt_tokens > 20  # frames became video tokens (plus timestamps)
    assert text


def post(server, body, raw=False, headers=None):
    content = body if raw else json.dumps(body)
    return httpx.post(server.url + "/v1/chat/completions", content=content, timeout=30,
                      headers={"content-type": "application/json", **(headers or {})})


def still_serving(server):
    assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 200
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


BAD = {
    "malformed_json": (b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    "unknown_field": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}, 400,
                      "unknown_field"),
    "unknown_message_field": ({"model": "tiny", "messages": [{"role": "user", "content": "hi", "x": 1}]}, 400,
                              "unknown_field"),
    "unreadable_image": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"this is not a png", "image/png")}},
        {"type": "text", "text": "?"}]}]}, 400, "invalid_image"),
    "unsupported_video": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url(b"\x00garbage" * 50, "video/mp4")}},
        {"type": "text", "text": "?"}]}]}, 400, "unsupported_video"),
    "too_many_media": ({"model": "tiny", "messages": image_message(n=3)}, 400, "too_many_media"),
    "wrong_type": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400,
                   "invalid_type"),
    "out_of_range": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_p": 7}, 400,
                     "invalid_value"),
    "no_messages": ({"model": "tiny"}, 400, "invalid_request"),
    "unknown_model": ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
    "local_path": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]}, 403, "local_path_refused"),
    "tools": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
              400, "unsupported_parameter"),
    "stop_too_long": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": "x" * 100_000},
                      400, "invalid_request"),
    "deeply_nested_json": (b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    "integer_of_5000_digits": (b'{"model": "tiny", "seed": ' + b"1" * 5000 + b"}", 400, "invalid_json"),
    "role_not_a_string": ({"model": "tiny", "messages": [{"role": ["user"], "content": "hi"}]}, 400,
                          "invalid_request"),
    "seed_over_64_bits": ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 10**30}, 400,
                          "invalid_value"),
    "loopback_url": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}]}]}, 403, "private_address_refused"),
    "cloud_metadata_url": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data/"}}]}]}, 403,
        "private_address_refused"),
    "pixel_bomb": ({"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png_bytes(9000, 8000, mode="1"), "image/png")}}]}]},
        400, "image_too_large"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_4xx_and_server_keeps_serving(tiny_server, case):
    body, status, code = BAD[case]
    r = post(tiny_server, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]
    assert "/tmp" not in err["message"] and "qvl-req-" not in err["message"]  # no server paths reach the client
    # the same through a streaming request: still an error status, not a broken stream
    if not isinstance(body, bytes) and "messages" in body:
        r = post(tiny_server, {**body, "stream": True})
        assert r.status_code == status
    still_serving(tiny_server)


@pytest.mark.parametrize("body,param", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff!"}]}]}',
     "messages[0].content[0].text"),
    (b'{"model": "tiny\\ud83d", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "tiny", "stop": ["\\ud800"], "messages": [{"role": "user", "content": "hi"}]}', "stop[0]"),
    (b'{"model": "tiny", "\\ud800": 1, "messages": [{"role": "user", "content": "hi"}]}', "\\ud800"),
])
def test_lone_surrogate_is_a_400_naming_the_field(tiny_server, body, param):
    """A lone UTF-16 surrogate in the text was a 500 (the tokenizer refused it): now a 400 that says where."""
    for stream in (b"false", b"true"):
        r = post(tiny_server, body[:-1] + b', "stream": ' + stream + b"}", raw=True)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_unicode" and err["param"] == param and param in err["message"]
    ok = b"hi \\ud83d\\ude00"  # a proper pair (an emoji) is fine
    r = post(tiny_server, b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "'
             + ok + b'"}]}', raw=True)
    assert r.status_code == 200, r.text
    still_serving(tiny_server)


def test_over_long_prompt(tiny, serve):
    from qvl.infer.transformers_backend import TransformersEngine

    engine = TransformersEngine(*tiny, name="tiny", max_model_len=64)
    server = serve(engine)
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "red green blue " * 60}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "64" in r.json()["error"]["message"]
    still_serving(server)
    engine.close()


def test_oversize_body(tiny_engine, serve):
    server = serve(tiny_engine, max_body_mb=0.01)
    r = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    still_serving(server)


def test_api_key(tiny_engine, serve):
    server = serve(tiny_engine, api_key="s3cret")
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/v1/models").json()["error"]["code"] == "invalid_api_key"
    assert post(server, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(server, "wrong").models.list()
    r = client(server, "s3cret").chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=2)
    assert r.choices[0].message.content is not None
    assert httpx.get(server.url + "/ui/config").status_code == 401  # the web chat's data needs the key too
    assert httpx.get(server.url + "/").status_code == 200  # the page itself holds nothing


def test_allowed_media_dir(tiny_engine, serve, tmp_path):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    server = serve(tiny_engine, allowed_media_dir=str(media))

    def ask(url):
        return post(server, {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "?"}]}]})

    assert ask(str(media / "a.png")).status_code == 200
    assert ask("file://" + str(media / "a.png")).status_code == 200
    assert ask(str(tmp_path / "secret.png")).status_code == 403
    assert ask(str(media / ".." / "secret.png")).status_code == 403
    assert ask("a.png").status_code == 200  # relative to the allowed folder
    r = ask(str(media / "a.png") + "\x00.txt")  # a NUL byte made Path.resolve() raise: a 500
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_media"
    r = ask("~no-such-user-qvl/a.png")  # expanduser() raised RuntimeError: a 500
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_media"


def test_two_concurrent_streams_complete(tiny_server):
    results = {}

    def run(i):
        stream = client(tiny_server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=16 + i, stream=True,
            stream_options={"include_usage": True}, temperature=0)
        text, finish, usage = "", None, None
        for ev in stream:
            usage = ev.usage or usage
            for ch in ev.choices:
                text += ch.delta.content or ""
                finish = ch.finish_reason or finish
        results[i] = (text, finish, usage)

    threads = [threading.Thread(target=run, args=(i,)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert set(results) == {1, 2}
    for i, (text, finish, usage) in results.items():
        assert finish == "length" and usage.completion_tokens == 16 + i and text
        # each answer equals the same request run alone (no cross-talk between the two streams)
        alone = client(tiny_server).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=16 + i, temperature=0)
        assert alone.choices[0].message.content == text


def test_client_disconnect_stops_generation(tiny_engine, serve):
    engine = ScriptedEngine("word " * 500, delay=0.01)
    server = serve(engine)
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json={"model": "scripted", "stream": True, "messages": [{"role": "user", "content": "go"}]}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    r = post(server, {"model": "scripted", "messages": [{"role": "user", "content": "again"}]})
    assert r.status_code == 200


def test_ui_page_and_grounding(tiny_server):
    page = httpx.get(tiny_server.url + "/")
    assert page.status_code == 200 and "tiny" in page.text and "<script>" in page.text
    cfg = httpx.get(tiny_server.url + "/ui/config").json()
    assert cfg["sampling"]["top_k"] == 20 and cfg["sampling"]["presence_penalty"] == 1.5
    r = httpx.post(tiny_server.url + "/ui/grounding", json={
        "text": 'Here: ```json\n[{"bbox_2d": [100, 200, 500, 1000], "label": "cat"}]\n```', "width": 640,
        "height": 480})
    items = r.json()["items"]
    assert items == [{"label": "cat", "bbox": [64.0, 96.0, 320.0, 480.0]}]
    for width in ("abc", [640], -5, True):  # were a 500 (float() of anything)
        r = httpx.post(tiny_server.url + "/ui/grounding", json={"text": "[]", "width": width, "height": 480})
        assert r.status_code == 400 and r.json()["error"]["param"] == "width", r.text
    r = httpx.post(tiny_server.url + "/ui/grounding", json={"text": '{"bbox_2d": [0, 0, 500, 500]}', "width": 0})
    assert r.json()["items"][0]["bbox"] == [0.0, 0.0, 500.0, 500.0]  # 0 (image not loaded): the 0-1000 grid
