"""Requests prepared in worker processes, so preprocessing does not take the interpreter from the engine.

In ``qvl serve`` the event loop, the preprocessing threads and the engine's thread share one interpreter lock. The
chat template, tokenizer, image processor and mRoPE positions are many small Python-level steps (~10-30 ms a
request), and while a thread runs them the engine's thread waits to launch its next step and the event loop to send
tokens: at 32 clients on an H200 a request waited 250 ms (p50) for the engine to admit it, against 0.14 s for the
whole time to first token with requests prepared beforehand (bench/results/serve.json, 2026-12-05). Here each worker
process holds a copy of the engine's :class:`~qvl.infer.prepare.Preparer` (no weights) and prepares one request at a
time; the server's thread waits on the result without the interpreter lock. On a 2-core CPU (tiny model, 448x448
PNGs) a request prepared in the server's process cost it 15.1 ms of CPU, one prepared by a worker 1.8 ms
(bench/experiments/results/prepare_contention_cpu.json). Still, there the server answered slower with workers (they
wait for a core: bench/experiments/results/prepare_pool_probe_cpu.json), so ``qvl serve`` uses them only when asked
(``--preprocess-workers N``) until a GPU host has measured them.

The result comes back pickled with its tensors as numpy arrays (bf16 ones, which numpy lacks, as torch pickles them),
each at a 64-byte boundary: unpickling a 448x448 image's request takes 0.15 ms
that way, against 5 ms through torch's own tensor pickling (it goes through ``torch.load``), all of it holding the
lock (2-core CPU). A large one comes through a file in a temporary folder, not the executor's pipe: 4.8 MB took 12 ms
through the pipe (64 KiB reads, the two processes taking turns), ~2 ms written and read back. (Not through shared
memory, as DataLoader workers return batches: requests in flight would hold it, and a container's default 64 MiB
/dev/shm would crash a busy server.)

A request whose images the server decoded carries their source keys (``qvl.infer.image_cache.SOURCE_INFO``); it goes
to the worker its first image's key picks, so a chat turn that re-sends an image finds it processed in that worker's
cache (unless that worker has more than one request beyond the least busy one's). Others go to the least busy. Each
worker is given one request at a time; a worker that dies is replaced, and only the request it was preparing is
answered with a 400 naming what happened.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import pickle
import shutil
import tempfile
import threading
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from qvl.infer.engine import Prepared, RequestError
from qvl.infer.types import Request

log = logging.getLogger("qvl.infer")

INLINE_BYTES = 256 * 2**10  # results up to this size come back through the executor's pipe, larger ones by file

_preparer = None  # the worker process's Preparer
_folder = None  # where it writes large results


def _init(preparer, folder: str, torch_threads: int) -> None:
    global _preparer, _folder
    import signal

    import torch

    # Ctrl-C in a terminal reaches the whole process group: the server shuts its workers down itself (a worker
    # interrupted in its queue's read would print a traceback on the way out)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # ...unless it dies first (killed, or ended by a signal uvicorn re-raises after its graceful shutdown, before the
    # server's `finally` runs): a worker also holds its queue's writing end, so it would wait for work forever
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), name="qvl-parent-watch", daemon=True).start()
    torch.set_num_threads(torch_threads)
    _preparer, _folder = preparer, folder


def _exit_with(sentinel) -> None:
    from multiprocessing.connection import wait

    wait([sentinel])  # ready when the parent process has ended
    os._exit(0)


def _ready() -> bool:
    return _preparer is not None


class _NumpyTensors(pickle.Pickler):
    """Pickles CPU tensors as numpy arrays (protocol 5: unpickled at copy speed, ``torch.from_numpy`` shares them)."""

    def reducer_override(self, obj):
        import torch

        if (isinstance(obj, torch.Tensor) and obj.device.type == "cpu" and obj.dtype != torch.bfloat16
                and not obj.requires_grad and obj.layout == torch.strided and not obj.is_conj() and not obj.is_neg()):
            return torch.from_numpy, (obj.contiguous().numpy(),)
        return NotImplemented


def dumps(obj) -> tuple[bytes, list]:
    """(pickle stream, its out-of-band buffers): the arrays' data stays where it is until written."""
    buf, buffers = io.BytesIO(), []
    _NumpyTensors(buf, protocol=5, buffer_callback=buffers.append).dump(obj)
    return buf.getvalue(), [b.raw() for b in buffers]


ALIGN = 64  # each part of a message starts at a multiple of this: the arrays unpickled over it are aligned


def _frame(stream: bytes, buffers: list) -> list:
    """The parts of one message: for the stream, then each buffer, its length (8 bytes), padding to :data:`ALIGN`,
    its bytes, padding to :data:`ALIGN`."""
    import struct

    parts = []
    for b in (stream, *buffers):
        n = memoryview(b).nbytes
        parts += [struct.pack("<Q", n), bytes(ALIGN - 8), b, bytes(-n % ALIGN)]
    return parts


def _unframe(data: memoryview):
    import struct

    pieces, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<Q", data, at)
        at += ALIGN
        pieces.append(data[at:at + n])  # the arrays unpickled over it keep ``data`` alive: no more copies
        at += n + (-n % ALIGN)
    return pickle.loads(pieces[0], buffers=pieces[1:])


def _prepare(request: Request):
    """-> ("ok", the pickled Prepared without its request, or the file holding it, cache stats), or ("error",
    RequestError's fields, cache stats)."""
    try:
        prepared = _preparer(request)
    except RequestError as e:
        return "error", (e.what, e.code, e.param, e.status, e.fix), _preparer.cache_stats()
    prepared.request = None  # the caller has it (with its images: no need to send them back)
    parts = _frame(*dumps(prepared))
    if sum(len(memoryview(p)) for p in parts) <= INLINE_BYTES:
        return "ok", b"".join(parts), _preparer.cache_stats()
    fd, path = tempfile.mkstemp(dir=_folder, suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(parts)
    except BaseException:
        os.unlink(path)
        raise
    return "ok", path, _preparer.cache_stats()


def _aligned(size: int) -> memoryview:
    """A writable buffer of ``size`` bytes starting at a multiple of :data:`ALIGN` in memory (torch does not take
    read-only arrays; a bytearray starts only 16-byte aligned)."""
    import numpy as np

    raw = np.empty(size + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return memoryview(raw[start:start + size])


def _receive(data: bytes | str):
    """The Prepared a worker sent: its arrays over an aligned, writable buffer."""
    if isinstance(data, str):  # the file the worker wrote
        try:
            with open(data, "rb") as f:
                buf = _aligned(os.fstat(f.fileno()).st_size)
                f.readinto(buf)
        finally:
            os.unlink(data)
        return _unframe(buf)
    buf = _aligned(len(data))
    buf[:] = data
    return _unframe(buf)


def route_key(request: Request) -> str | None:
    """The source key of the request's first image the server decoded (None when it has none)."""
    from qvl.infer.image_cache import SOURCE_INFO

    for message in request.messages:
        for part in message.parts:
            info = getattr(getattr(part, "source", None), "info", None)
            if isinstance(info, dict) and info.get(SOURCE_INFO):
                return info[SOURCE_INFO]
    return None


class PreparePool:
    """``pool(request) -> Prepared``, as ``preparer(request)`` but in ``workers`` processes (blocking; any thread).

    Each worker is a one-process executor given one request at a time (the others wait here, in the caller's
    thread): a worker that dies takes only the request it was preparing with it."""

    def __init__(self, preparer, workers: int, torch_threads: int | None = None):
        if workers < 1:
            raise ValueError("a prepare pool needs at least one worker")
        # the image processor's tensor ops: half the cores shared out, 1-4 threads a worker
        torch_threads = torch_threads or max(1, min(4, (os.cpu_count() or 1) // (2 * workers)))
        self.preparer, self.torch_threads = preparer, torch_threads
        self._context = multiprocessing.get_context("spawn")  # never fork a process holding CUDA and threads
        self._folder = tempfile.mkdtemp(prefix="qvl-prepare-")
        self._lock = threading.Lock()
        self._in_hand = [0] * workers  # requests given to or waiting for each worker
        self._turns = [threading.Lock() for _ in range(workers)]  # held while a worker prepares a request
        self._stats: list[dict] = [{} for _ in range(workers)]
        self._stats_before: dict = {}  # what replaced workers had counted
        self.restarts = 0
        self._closed = False
        t = time.perf_counter()
        self._workers: list[ProcessPoolExecutor] = []
        try:
            self._workers = [self._start() for _ in range(workers)]
            # spawned and initialised (torch and transformers imported) before the first request, side by side
            for ready in [w.submit(_ready) for w in self._workers]:
                ready.result()
        except BaseException:
            self.close()
            raise
        self.start_s = time.perf_counter() - t

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(1, mp_context=self._context, initializer=_init,
                                   initargs=(self.preparer, self._folder, self.torch_threads))

    @property
    def workers(self) -> int:
        return len(self._workers)

    def _choose(self, request: Request) -> int:
        """The worker for ``request`` (counted in its hand): its first image's worker, unless that one has more than
        one request beyond the least busy's (a cache miss costs less than the wait), else the least busy."""
        key = route_key(request)
        with self._lock:
            least = min(range(len(self._workers)), key=self._in_hand.__getitem__)
            i = least
            if key is not None:
                sticky = int(key[:8], 16) % len(self._workers)
                if self._in_hand[sticky] <= self._in_hand[least] + 1:
                    i = sticky
            self._in_hand[i] += 1
        return i

    def _replace(self, i: int, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._closed or self._workers[i] is not broken:  # shutting down, or replaced already
                return
            self.restarts += 1
            for k, v in self._stats[i].items():
                self._stats_before[k] = self._stats_before.get(k, 0) + v
            self._stats[i] = {}
            self._workers[i] = self._start()
        broken.shutdown(wait=False, cancel_futures=True)
        log.warning("a preprocessing worker process died; started another")

    def __call__(self, request: Request) -> Prepared:
        i = self._choose(request)
        try:
            with self._turns[i]:
                if self._closed:
                    raise self._shutting_down()
                worker = self._workers[i]
                try:
                    try:
                        future = worker.submit(_prepare, request)
                    except (BrokenProcessPool, RuntimeError):  # it died idle (killed, say): not this request's fault
                        self._replace(i, worker)
                        worker = self._workers[i]
                        future = worker.submit(_prepare, request)
                    status, value, stats = future.result()
                except BrokenProcessPool:
                    if self._closed:
                        raise self._shutting_down() from None
                    self._replace(i, worker)
                    raise RequestError("preprocessing this request crashed its worker process (an image or video its "
                                       "decoder cannot survive?); the server started another and goes on",
                                       code="preprocessing_crashed", param="messages",
                                       fix="check the request's media; the server log may say more") from None
                except (RuntimeError, CancelledError):  # close() came between: submit refused, or the future dropped
                    if self._closed:
                        raise self._shutting_down() from None
                    raise
                with self._lock:
                    if self._workers[i] is worker:  # not a replaced worker's late numbers
                        self._stats[i] = stats
        finally:
            with self._lock:
                self._in_hand[i] -= 1
        if status == "error":
            what, code, param, status_code, fix = value
            raise RequestError(what, code=code, param=param, status=status_code, fix=fix)
        prepared = _receive(value)
        prepared.request = request
        return prepared

    @staticmethod
    def _shutting_down() -> RequestError:
        return RequestError("the server is shutting down", code="server_shutting_down", status=503)

    def cache_stats(self) -> dict:
        """The workers' processed-image caches' hits and misses, summed (replaced workers' included)."""
        with self._lock:
            out = dict(self._stats_before)
            for stats in self._stats:
                for k, v in stats.items():
                    out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for w in self._workers:
            w.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self._folder, ignore_errors=True)
