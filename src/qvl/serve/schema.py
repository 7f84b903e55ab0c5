"""OpenAI chat-completions request validation: every problem becomes a 4xx with an OpenAI error body.

Validation is hand-written (not FastAPI's automatic 422) so that the body always has OpenAI's
shape ``{"error": {"message", "type", "param", "code"}}`` and names the field and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

# Fields of OpenAI's chat-completions request that qvl implements, plus vLLM's sampling extras.
SAMPLING_FIELDS = {
    "temperature": (int, float), "top_p": (int, float), "top_k": (int,), "presence_penalty": (int, float),
    "frequency_penalty": (int, float), "repetition_penalty": (int, float), "seed": (int,),
    "max_tokens": (int,), "max_completion_tokens": (int,),
}
ACCEPTED_AND_IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
KNOWN = {"model", "messages", "stream", "stream_options", "stop", "n", "logprobs", "top_logprobs", "ignore_eos",
         "response_format", "tools", "tool_choice", "functions", "function_call", "logit_bias",
         *SAMPLING_FIELDS, *ACCEPTED_AND_IGNORED}
MAX_STOP_CHARS = 256  # stop strings are matched on every token: a megabyte-long one would stall the worker
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.type = status, message, code, param, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str = "invalid_request", status: int = 400) -> ApiError:
    return ApiError(status, message, code, param)


@dataclass
class MediaRef:
    kind: str  # image | video
    url: str
    param: str  # where it was in the request, for error messages


@dataclass
class ChatRequest:
    model: str
    messages: list[tuple[str, list]]  # (role, parts: str | MediaRef)
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)  # qvl SamplingParams field -> value

    def media(self) -> list[MediaRef]:
        return [p for _, parts in self.messages for p in parts if isinstance(p, MediaRef)]


def _lone_surrogate(value) -> str | None:
    """Where in a parsed JSON value a string holds a lone UTF-16 surrogate (``"\\ud800"``), or None.

    JSON allows the escape, Python keeps it, and the tokenizer (and any UTF-8 encoder) fails on it later, so
    it is found here, with its place, before anything else reads the request. Iterative: deep JSON is legal."""
    todo = [("", value)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return where or "(the body)"
        elif isinstance(v, dict):
            for k, item in v.items():
                name = k.encode("utf-8", "backslashreplace").decode("utf-8")  # a key can hold one too
                if name != k:
                    return f"{where}.{name}" if where else name
                todo.append((f"{where}.{k}" if where else k, item))
        elif isinstance(v, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(v))
    return None


_REFUSED = object()  # what _fast_loads gives for a body it leaves to json.loads (None is JSON's null)


def _fast_loads(raw: bytes):
    """The body through pydantic-core's parser (fastapi's own dependency), or ``_REFUSED`` where it refuses it or is
    not installed. It parses a chat turn carrying a 1024x1024 PNG (4.2 MB of JSON) in 0.6 ms against json.loads' 3.4
    (2-core CPU, 2026-12-06), on the server's event loop, once per request. What it refuses (a lone surrogate,
    deeper than 200 levels, UTF-16 bodies, a 5,000-digit integer) goes to json.loads, which accepts it or says
    precisely what is wrong (:func:`parse_json`)."""
    try:
        from pydantic_core import from_json
    except ImportError:
        return _REFUSED
    try:
        return from_json(raw, cache_strings="keys")  # keys only: no request's text is kept for the next one
    except (ValueError, TypeError):  # TypeError: a pydantic-core from before cache_strings
        return _REFUSED


def parse_json(raw: bytes):
    body = _fast_loads(raw)
    if body is not _REFUSED:
        return body  # the fast parser refuses lone surrogates (json.loads keeps them): nothing more to check
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise bad(f"request body cannot be read: {e}", code="invalid_json") from None
    except RecursionError:  # '[[[[...' thousands deep: refuse it instead of a 500
        raise bad("request body is nested too deeply", code="invalid_json") from None
    where = _lone_surrogate(body)
    if where is not None:
        raise bad(f"'{where}' holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), which is "
                  "not valid Unicode; send the text as UTF-8 or escape both halves of the pair", param=where,
                  code="invalid_unicode")
    return body


def _number(body: dict, key: str):
    v = body[key]
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, SAMPLING_FIELDS[key]):
        kind = "an integer" if SAMPLING_FIELDS[key] == (int,) else "a number"
        raise bad(f"'{key}' must be {kind}, got {json.dumps(v)[:40]}", param=key, code="invalid_type")
    return v


def _parts(content, where: str) -> list:
    if isinstance(content, str):
        return [content]
    if content is None:
        return []
    if not isinstance(content, list):
        raise bad(f"'{where}.content' must be a string or a list of content parts", param=f"{where}.content")
    parts: list = []
    for j, part in enumerate(content):
        p = f"{where}.content[{j}]"
        if not isinstance(part, dict) or "type" not in part:
            raise bad(f"'{p}' must be an object with a 'type'", param=p)
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad(f"'{p}.text' must be a string", param=f"{p}.text")
            parts.append(part["text"])
        elif kind in ("image_url", "video_url", "image", "video"):
            value = part.get(kind)
            url = value.get("url") if isinstance(value, dict) else value
            if not isinstance(url, str) or not url:
                raise bad(f"'{p}.{kind}' needs a 'url' (a data: URL, an http(s) URL or an allowed local path)",
                          param=f"{p}.{kind}")
            extra = set(part) - {"type", kind}
            if extra:
                raise bad(f"unknown field(s) {sorted(extra)} in '{p}'", param=p, code="unknown_field")
            parts.append(MediaRef(kind.removesuffix("_url"), url, p))
        else:
            raise bad(f"content part type {kind!r} is not supported (use text, image_url or video_url)", param=p,
                      code="unsupported_content")
    return parts


def parse_chat(body, limits: dict[str, int]) -> ChatRequest:
    """Validate a chat-completions body; ``limits``: the most images/videos one request may carry."""
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN)
    if unknown:
        raise bad(f"unknown field(s): {', '.join(unknown)}", param=unknown[0], code="unknown_field")
    for key, why in (("tools", "tool calling"), ("functions", "function calling"), ("logit_bias", "logit_bias")):
        if body.get(key):
            raise bad(f"{why} is not supported by qvl serve", param=key, code="unsupported_parameter")
    if body.get("tool_choice") not in (None, "none"):
        raise bad("tool calling is not supported by qvl serve", param="tool_choice", code="unsupported_parameter")
    if body.get("function_call") not in (None, "none"):
        raise bad("function calling is not supported by qvl serve", param="function_call",
                  code="unsupported_parameter")
    if body.get("n") not in (None, 1):
        raise bad("only n=1 is supported", param="n", code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad("logprobs are not supported by qvl serve", param="logprobs", code="unsupported_parameter")
    rf = body.get("response_format")
    if rf not in (None, {"type": "text"}):
        raise bad("only response_format {'type': 'text'} is supported", param="response_format",
                  code="unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("'model' is required (see GET /v1/models)", param="model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("'stream' must be true or false", param="stream", code="invalid_type")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict) or set(so) - {"include_usage", "continuous_usage_stats"}:
        raise bad("'stream_options' accepts only include_usage", param="stream_options")

    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise bad("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", param=where)
        extra = set(m) - {"role", "content", "name"}
        if extra:
            raise bad(f"unknown field(s) {sorted(extra)} in '{where}'", param=where, code="unknown_field")
        role = ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
        if role is None:
            raise bad(f"'{where}.role' must be system, user or assistant, got {m.get('role')!r}",
                      param=f"{where}.role")
        parts = _parts(m.get("content"), where)
        if role != "user" and any(isinstance(p, MediaRef) for p in parts):
            raise bad(f"'{where}': only user messages may hold images or videos", param=where)
        messages.append((role, parts))
    if messages[-1][0] != "user":
        raise bad("the last message must be a user message", param=f"messages[{len(messages) - 1}]")
    if any(r == "system" for r, _ in messages[1:]):
        raise bad("a system message is only allowed first", param="messages")

    req = ChatRequest(model, messages, bool(stream), bool(so.get("include_usage")))
    counts = {"image": 0, "video": 0}
    for ref in req.media():
        counts[ref.kind] += 1
    for kind, n in counts.items():
        if n > limits.get(kind, 0):
            raise bad(f"{n} {kind}s in one request; this server allows at most {limits.get(kind, 0)} "
                      f"(--limit-mm-per-prompt)", param="messages", code="too_many_media")

    s = {}
    for key in SAMPLING_FIELDS:
        if key in body:
            v = _number(body, key)
            if v is not None:
                s[key] = v
    if "max_completion_tokens" in s:
        s["max_tokens"] = s.pop("max_completion_tokens")
    if "max_tokens" in s:
        s["max_new_tokens"] = s.pop("max_tokens")
        if s["max_new_tokens"] < 1:
            raise bad("'max_tokens' must be at least 1", param="max_tokens")
    ignore_eos = body.get("ignore_eos")  # vLLM's extra: run to max_tokens (benchmarks with random weights)
    if ignore_eos is not None:
        if not isinstance(ignore_eos, bool):
            raise bad("'ignore_eos' must be true or false", param="ignore_eos", code="invalid_type")
        s["ignore_eos"] = ignore_eos
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or len(stop) > 8 or \
                not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop):
            raise bad(f"'stop' must be a string or a list of up to 8 non-empty strings of at most {MAX_STOP_CHARS} "
                      "characters", param="stop")
        s["stop"] = tuple(stop)
    req.sampling = s
    return req
