"""Helpers for the serve tests (imported by name: this folder is on sys.path under pytest)."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time

from qvl.infer.engine import Engine, Prepared
from qvl.infer.types import Chunk, Handle, SamplingParams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        pool = getattr(self.app.state, "prepare_pool", None)  # --preprocess-workers: its processes
        if pool is not None:
            pool.close()


def png_bytes(w=64, h=48, color=(200, 30, 30), mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def make_mp4(path, frames=8, w=64, h=48, fps=4) -> str:
    import av
    import numpy as np

    with av.open(str(path), "w") as out:
        s = out.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            arr = np.full((h, w, 3), (i * 30) % 255, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return str(path)


class ScriptedEngine(Engine):
    """An engine that streams a fixed answer word by word (for UI/API behaviour without a real model)."""

    backend = "scripted"

    def __init__(self, answer: str, name="scripted", delay=0.02):
        self.answer, self.name, self.delay = answer, name, delay
        self.max_model_len = 4096
        self.default_sampling = SamplingParams()
        self.seen = []

    def prepare(self, request):
        self.seen.append(request)
        return Prepared(request, request.sampling, 10, None)

    def submit(self, prepared, on_chunk=None):
        handle = Handle(10, on_chunk)

        def run():
            pieces = [p for p in self.answer.replace(" ", " \x00").split("\x00") if p]
            for p in pieces:
                if handle.cancelled:
                    handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=10, completion_tokens=0))
                    return
                time.sleep(self.delay)
                handle.emit(Chunk(text=p))
            handle.emit(Chunk(finish_reason="stop", prompt_tokens=10, completion_tokens=len(pieces)))

        threading.Thread(target=run, daemon=True).start()
        return handle
