"""``qvl serve``: one FastAPI server with the OpenAI-compatible API under /v1 and the web chat at /.

Every bad input is answered with a 4xx and an OpenAI-style error body; the model runs on the
engine's worker, so a bad request never touches it and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request as HttpRequest  # module level: FastAPI resolves annotations here

from qvl.infer.engine import Engine, RequestError
from qvl.infer.types import Chunk, Request
from qvl.data.grounding import parse_grounding, to_pixels
from qvl.serve.schema import ApiError, ChatRequest, MediaRef, bad, parse_chat, parse_json
from qvl.serve.stages import Marks, StageLog
from qvl.serve.threads import ThreadSampler

log = logging.getLogger("qvl.serve")


@dataclass
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    allowed_media_dir: str | None = None
    max_body_mb: float = 64.0
    max_media_mb: float = 32.0
    limit_mm_per_prompt: dict = field(default_factory=lambda: {"image": 8, "video": 2})
    allow_remote_media: bool = True
    allow_private_media_urls: bool = False  # http(s) media on loopback/private/link-local hosts (SSRF)
    served_model_name: str | None = None
    # requests preprocessed at once in the server's process (chat template, tokenizer, image processor; their media
    # are fetched and decoded before, outside this limit): see create_app's ``prepare``
    preprocess_threads: int = 2
    # worker processes preparing requests instead (qvl.infer.prepare_pool); 0: in the server's process (the default
    # until a GPU run shows the workers faster: on a 2-core CPU they were slower, docs/serve.md)
    preprocess_workers: int = 0
    inbrowser: bool = False
    share: bool = False
    log_level: str = "info"

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


def parse_limits(text: str | None) -> dict[str, int]:
    """``image=4,video=1`` or JSON ``{"image": 4, "video": 1}`` (vLLM's syntax) -> dict."""
    from qvl.errors import QvlError

    limits = {"image": 8, "video": 2}
    if not text:
        return limits
    try:
        given = json.loads(text) if text.strip().startswith("{") else {
            k.strip(): int(v) for k, v in (p.split("=") for p in text.split(",") if p.strip())}
    except (ValueError, json.JSONDecodeError):
        raise QvlError(f"--limit-mm-per-prompt {text!r} is not understood", fix="use image=4,video=1") from None
    bad_keys = set(given) - set(limits)
    if bad_keys or any(not isinstance(v, int) or v < 0 for v in given.values()):
        raise QvlError(f"--limit-mm-per-prompt {text!r}: keys are image and video, values integers >= 0")
    limits.update(given)
    return limits


def _dimension(body: dict, key: str) -> float:
    """``width`` / ``height`` of /ui/grounding: a positive number of pixels (default 1000: the 0-1000 grid)."""
    v = body.get(key)
    if v is None or (type(v) in (int, float) and v == 0):  # 0: the page's image has not loaded
        return 1000.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1_000_000:
        raise bad(f"'{key}' must be a number of pixels between 1 and 1000000", param=key, code="invalid_value")
    return float(v)


def _error(e: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status)


def create_app(engine: Engine, settings: ServeSettings | None = None):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    from qvl.data.samples import Media, Message
    from qvl.serve.media import MediaResolver
    from qvl.serve.ui import page

    settings = settings or ServeSettings()
    model_id = settings.served_model_name or engine.name
    resolver = MediaResolver(settings.allowed_media_dir, int(settings.max_media_mb * 2**20),
                             settings.allow_remote_media, allow_private=settings.allow_private_media_urls)
    app = FastAPI(title="qvl serve", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())
    pool = app.state.prepare_pool = start_prepare_pool(engine, settings.preprocess_workers)
    prepare_request = pool if pool is not None else engine.prepare

    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return _error(ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else "http_error"))

    @app.exception_handler(RequestValidationError)
    async def _validation(_, e):
        return _error(bad(f"invalid request: {e}"))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):
        log.exception("unexpected error")
        return JSONResponse({"error": {"message": f"internal error: {type(e).__name__}", "type": "server_error",
                                       "param": None, "code": "internal_error"}}, status_code=500)

    def check_key(request: HttpRequest) -> None:
        if not settings.api_key:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key")

    async def read_body(request: HttpRequest) -> bytes:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise bad(f"request body is {int(declared) / 2**20:.1f} MiB; the limit is {limit / 2**20:.1f} MiB "
                      "(--max-body-mb)", code="request_too_large", status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise bad(f"request body is over the {limit / 2**20:.1f} MiB limit (--max-body-mb)",
                          code="request_too_large", status=413)
        return bytes(body)

    def prepare(chat: ChatRequest, request_id: str, marks: Marks):
        """Media -> pipeline inputs -> engine.prepare (blocking: runs in the thread pool)."""
        marks.mark("pool")
        try:  # before any media is fetched or decoded: a request with bad settings costs nothing
            sampling = engine.sampling(**chat.sampling)
        except Exception as e:  # out-of-range values
            raise bad(str(getattr(e, "what", e)), code="invalid_value") from None
        with tempfile.TemporaryDirectory(prefix="qvl-req-") as tmp:
            messages = []
            for role, parts in chat.messages:
                out = []
                for p in parts:
                    if isinstance(p, MediaRef):
                        src = resolver.image(p) if p.kind == "image" else resolver.video(p, Path(tmp))
                        out.append(Media(p.kind, src))
                    else:
                        out.append(p)
                messages.append(Message(role, out))
            marks.mark("media")
            try:  # videos are decoded inside prepare, so the temp folder lives until it returns
                with preprocessing:
                    marks.mark("slot")
                    prepared = prepare_request(Request(messages, sampling, request_id))
                marks.mark("prepared")
                return prepared
            except RequestError as e:
                raise ApiError(e.status, e.what + (f" ({e.fix})" if e.fix else ""), code=e.code, param=e.param) \
                    from None

    # Preprocessing holds the GIL for much of its time, and the engine's thread and the event loop need it too. Run
    # by every request at once (the thread pool has 40 threads), a burst of N requests shares it N ways: all of them
    # finish late, and meanwhile the engine and the streams of the running requests get a fraction of the
    # interpreter. A few at a time, they finish in arrival order, each as soon as it alone would. (Media are
    # fetched, and images decoded, before, outside this limit: a slow remote URL holds no preprocessing slot; a
    # video's frames are read inside prepare, so a video request holds its slot while they are.) With worker
    # processes, each prepares one request at a time: they are the limit.
    import contextlib
    import threading

    preprocessing = (contextlib.nullcontext() if pool is not None
                     else threading.BoundedSemaphore(max(1, settings.preprocess_threads)))
    relays: dict = {}  # event loop -> its Relay (one loop in production; tests may run several servers)
    stage_log = StageLog()
    thread_sampler = ThreadSampler()

    def start(prepared, marks: Marks):
        loop = asyncio.get_running_loop()
        relay = relays.get(loop) or relays.setdefault(loop, Relay(loop))
        q: asyncio.Queue[Chunk] = asyncio.Queue()
        put = relay.put

        def on_chunk(c: Chunk) -> None:  # the engine's thread
            if c.text and "token" not in marks:
                marks.mark("token")
            put(q, c)

        marks.mark("submitted")
        handle = engine.submit(prepared, on_chunk=on_chunk)
        return handle, q

    def first_out(rid: str, marks: Marks, handle) -> None:
        """The first content left: the request's stage times go to /debug/stages (and the DEBUG log)."""
        marks.mark("sent")
        admitted = getattr(handle, "prefill_started", None)  # set by the transformers backend's batcher
        if admitted is not None:
            marks.mark("admitted", admitted)
        stage_log.finish(rid, marks)

    # ------------------------------------------------------------------ routes
    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page(model_id, engine.backend, bool(settings.api_key))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/debug/stages")
    async def debug_stages(request: HttpRequest, reset: bool = False):
        """Where the last requests' time went before their first token left (see qvl.serve.stages), and what chat
        turns reused so far (``reuse``: the engine's running totals); ``?reset=true`` starts a new window after
        answering."""
        check_key(request)
        out = stage_log.summary()
        cache_stats = getattr(engine, "cache_stats", None)  # running totals (the reset leaves them)
        if cache_stats is not None:
            out["reuse"] = cache_stats() | (pool.cache_stats() if pool is not None else {})
        if reset:
            stage_log.clear()
        return out

    @app.post("/debug/threads")
    async def debug_threads_start(request: HttpRequest):
        """Open a window of thread sampling (qvl.serve.threads); ``GET /debug/threads`` closes it and answers."""
        check_key(request)
        thread_sampler.start()
        return {"started": True, "interval_s": thread_sampler.interval}

    @app.get("/debug/threads")
    async def debug_threads(request: HttpRequest):
        """Each thread's CPU seconds and the functions it was seen in since ``POST /debug/threads``."""
        check_key(request)
        out = thread_sampler.stop()
        if not out:
            raise bad("no thread-sampling window is open: POST /debug/threads starts one", code="no_window",
                      status=409)
        return out

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "qvl", "max_model_len": engine.max_model_len}]}

    @app.get("/ui/config")
    async def ui_config(request: HttpRequest):
        check_key(request)
        s = engine.default_sampling
        return {"model": model_id, "backend": engine.backend, "thinking": engine.thinking,
                "max_model_len": engine.max_model_len, "limits": settings.limit_mm_per_prompt,
                "sampling": {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                             "presence_penalty": s.presence_penalty, "max_tokens": s.max_new_tokens}}

    @app.post("/ui/grounding")
    async def grounding(request: HttpRequest):
        """Boxes/points of an answer, in pixels of a ``width`` x ``height`` image (for drawing)."""
        check_key(request)
        body = parse_json(await read_body(request))
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise bad("send {'text': str, 'width': int, 'height': int}")
        w, h = (_dimension(body, k) for k in ("width", "height"))
        items = []
        for it in parse_grounding(body["text"]):
            try:
                if "bbox_2d" in it:
                    items.append({"label": it.get("label", ""), "bbox": to_pixels(it["bbox_2d"], w, h)})
                elif "point_2d" in it:
                    items.append({"label": it.get("label", ""), "point": to_pixels(it["point_2d"], w, h)})
            except Exception:
                continue
        return {"items": items}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        marks = Marks()
        marks.mark("arrived")
        check_key(request)
        body = await read_body(request)
        marks.mark("read")
        chat = parse_chat(parse_json(body), settings.limit_mm_per_prompt)
        marks.mark("parsed")
        if chat.model not in (model_id, engine.name):
            raise ApiError(404, f"model {chat.model!r} is not served here; GET /v1/models lists {model_id!r}",
                           code="model_not_found", param="model")
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        prepared = await run_in_threadpool(prepare, chat, rid, marks)
        now = int(time.time())
        handle, q = start(prepared, marks)

        def usage(c: Chunk) -> dict:
            return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                    "total_tokens": c.prompt_tokens + c.completion_tokens}

        if not chat.stream:
            parts = []
            try:
                while True:
                    c = await q.get()
                    parts.append(c.text)
                    if c.finish_reason is not None:
                        break
            finally:
                handle.cancel()  # no-op when finished; stops the model when the client went away
            if c.finish_reason == "error":
                raise ApiError(500, f"generation failed: {c.error}", code="generation_failed", type_="server_error")
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                 "finish_reason": c.finish_reason, "logprobs": None}],
                    "usage": usage(c)}

        def event(delta: dict, finish=None, **extra) -> str:
            obj = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        content = ContentEvents(event)

        async def events():
            try:
                yield event({"role": "assistant", "content": ""})
                c = Chunk()
                while c.finish_reason is None:
                    # every chunk already here goes out in one write: a stream that fell behind catches up
                    # in one send instead of one per token
                    chunks = [await q.get()]
                    while chunks[-1].finish_reason is None and not q.empty():
                        chunks.append(q.get_nowait())
                    c = chunks[-1]
                    text = "".join(content(x.text) for x in chunks if x.text)
                    if text:
                        if "sent" not in marks:
                            marks.mark("loop")
                            yield text
                            first_out(rid, marks, handle)
                        else:
                            yield text
                if c.finish_reason == "error":
                    err = {"error": {"message": f"generation failed: {c.error}", "type": "server_error",
                                     "param": None, "code": "generation_failed"}}
                    yield f"data: {json.dumps(err)}\n\n"
                else:
                    yield event({}, c.finish_reason)
                    if chat.include_usage:
                        obj = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                               "choices": [], "usage": usage(c)}
                        yield f"data: {json.dumps(obj)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()  # the client went away (or we are done): stop generating for it

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class Relay:
    """Chunks from the engine's thread into the event loop, one wake-up per batch instead of one per token.

    ``loop.call_soon_threadsafe`` per token writes to the loop's wake-up pipe each time: at 64 streams that
    is ~10,000 system calls and loop iterations a second. Here the engine thread appends to a deque and
    wakes the loop only when no wake-up is pending; the loop then hands every waiting chunk to its queue.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        import collections

        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.pending = False

    def put(self, q: asyncio.Queue, chunk: Chunk) -> None:  # any thread
        self.items.append((q, chunk))
        if not self.pending:  # read after the append: a drain that already ran leaves it False
            self.pending = True
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
                pass

    def _drain(self) -> None:  # the loop's thread
        self.pending = False
        items = self.items
        while items:
            q, chunk = items.popleft()
            q.put_nowait(chunk)


class ContentEvents:
    """``data: {...}`` lines of content deltas, as ``event({"content": text})`` writes them, without building and
    serialising the whole object for every token: the parts around the text are serialised once."""

    MARK = "\x00qvl-content\x00"

    def __init__(self, event):
        head, _, tail = event({"content": self.MARK}).partition(json.dumps(self.MARK, ensure_ascii=False))
        self.head, self.tail = head, tail

    def __call__(self, text: str) -> str:
        return self.head + json.dumps(text, ensure_ascii=False) + self.tail


def http_stack() -> str:
    """What uvicorn serves with: its C event loop (uvloop) and HTTP parser (httptools) when installed (`pip install
    qvl[serve]` brings them; uvloop has no Windows build), else asyncio and the pure-Python h11, each said with its
    fix. On a 2-core CPU (tiny model, 64 streaming clients) the server's main thread spent 0.42-0.47 CPU-s against
    0.56 without them, and served ~2-8 % more tokens/s (bench/experiments/results/serve_http_stack_cpu.json)."""
    import importlib.util
    import sys

    def have(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    loop = "uvloop" if have("uvloop") else "asyncio" + (
        "" if sys.platform == "win32" else " (`pip install uvloop` is faster)")
    parser = "httptools" if have("httptools") else "h11 (`pip install httptools` is faster)"
    return f"{loop} + {parser}"


def start_prepare_pool(engine: Engine, workers: int):
    """The worker processes that prepare requests (qvl.infer.prepare_pool), or None to prepare them in this process:
    ``workers`` 0, or an engine without a picklable preparer (vLLM prepares its own way)."""
    preparer = getattr(engine, "preparer", None)
    if preparer is None or workers < 1:
        return None
    from qvl.infer.prepare_pool import PreparePool

    return PreparePool(preparer, workers)


def preprocessing_line(pool, settings: ServeSettings) -> str:
    if pool is not None:
        return (f"{pool.workers} worker process{'es' if pool.workers > 1 else ''} (started in {pool.start_s:.1f} s; "
                "--preprocess-workers)")
    return (f"in the server's process, {settings.preprocess_threads} at a time (--preprocess-workers N: in N "
            "processes)")


def banner(engine: Engine, settings: ServeSettings, pool=None) -> str:
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "localhost"
    url = f"http://{host}:{settings.port}"
    lines = [f"qvl serve: {engine.describe()}",
             f"  web chat   {url}/",
             f"  OpenAI API {url}/v1  (model id {settings.served_model_name or engine.name!r})",
             f"  HTTP       {http_stack()}"]
    if getattr(engine, "preparer", None) is not None:
        lines.append(f"  preprocess {preprocessing_line(pool, settings)}")
    elif settings.preprocess_workers:
        lines.append(f"  note: --preprocess-workers is for the transformers backend; {engine.backend} prepares "
                     "requests its own way")
    if settings.api_key:
        lines.append("  API key required (Authorization: Bearer ...)")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        lines.append(f"  warning: listening on {settings.host} without --api-key: anyone who can reach this "
                     "port can use the model")
    return "\n".join(lines)


def run_server(engine: Engine, settings: ServeSettings, say=print) -> None:
    """Serve until interrupted (blocking)."""
    import gc
    import sys
    import threading
    import webbrowser

    import uvicorn

    # The engine's worker and the event loop share the GIL. When the worker wakes from the GPU (its wait
    # releases the GIL) while the loop is busy sending, it waits up to the switch interval (5 ms, a whole decode
    # step) for the GIL. At 0.5 ms: a scripted engine's step time (1 ms of host work in a 5 ms step) under 128
    # streams went from 7.6 to 7.0-7.3 ms mean, p99 at 64 streams from 11 to 9 ms (docs/serve.md).
    sys.setswitchinterval(0.0005)
    # What is loaded by now (torch, transformers, the model, the engine's compiled and captured steps) lives as
    # long as the server: frozen, Python's full collections under load scan only what requests made since. Such a
    # collection holds the GIL, so it stops the event loop and the engine together: a process with the 8B model
    # built holds ~0.4 M objects, a full collection of them took 0.24-0.27 s on a 2-core CPU, and at 64 clients
    # every server stage's p99 was ~0.6 s (H100, 2026-12-05, bench/results/serve_h100.json). vLLM freezes too.
    gc.collect()
    gc.freeze()
    app = create_app(engine, settings)
    pool = app.state.prepare_pool
    say(banner(engine, settings, pool))
    if settings.share:
        say("  note: --share (a public Gradio link) is not available: qvl's chat page is served by this server. "
            f"Use `ssh -L {settings.port}:localhost:{settings.port} host` or bind --host 0.0.0.0 with --api-key.")
    if settings.inbrowser:
        url = f"http://{'localhost' if settings.host in ('0.0.0.0', '::') else settings.host}:{settings.port}/"
        threading.Timer(1.5, webbrowser.open, args=(url,)).start()
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    finally:
        if pool is not None:
            pool.close()
