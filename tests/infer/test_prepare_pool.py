"""qvl.infer.prepare_pool: requests prepared in worker processes equal those prepared in the server's process; errors
keep their status; a re-sent image finds its worker's cache; a dying worker is replaced."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

from qvl.data.samples import Media, Message
from qvl.infer import prepare_pool
from qvl.infer.engine import RequestError
from qvl.infer.image_cache import SOURCE_INFO
from qvl.infer.prepare import Preparer
from qvl.infer.prepare_pool import PreparePool
from qvl.infer.transformers_backend import TransformersEngine
from qvl.infer.types import Request


class CrashingPreparer(Preparer):
    """Dies (as a decoder that segfaults would) on a request whose text is "crash"."""

    def __call__(self, request):
        if request.messages[-1].text == "crash":
            os._exit(3)
        return super().__call__(request)


@pytest.fixture(scope="module")
def engine(tiny):
    e = TransformersEngine(*tiny, name="tiny")
    yield e
    e.close()


@pytest.fixture(scope="module")
def pool(engine):
    p = PreparePool(engine.preparer, 2)
    yield p
    p.close()


def image(seed: int, side: int = 96, key: str | None = None) -> Image.Image:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8))
    if key is not None:
        img.info[SOURCE_INFO] = key  # as the server's media resolver marks what it decoded
    return img


def video(tmp_path) -> str:
    import sys
    from pathlib import Path

    pytest.importorskip("av")
    sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
    from helpers import write_video

    return str(write_video(tmp_path / "clip.mp4", frames=8, fps=4))


def ask(engine, *parts, **sampling) -> Request:
    return Request([Message("user", list(parts))], engine.sampling(**sampling))


def assert_same(a, b):
    assert (a.prompt_tokens, a.sampling, a.media_keys) == (b.prompt_tokens, b.sampling, b.media_keys)
    for name in ("input_ids", "mm_token_type_ids", "positions", "pixel_values", "image_grid_thw",
                 "pixel_values_videos", "video_grid_thw"):
        x, y = getattr(a.inputs, name), getattr(b.inputs, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("parts", [
    lambda: ["just text"],  # small: back through the executor's pipe
    lambda: [image(0, 320), "describe"],  # large: back through a file
    lambda: [image(1), "and", image(2, 64), "compare"],
    lambda tmp: [Media("video", video(tmp)), "what happens?"],  # its frames decoded in the worker
], ids=["text", "image", "two-images", "video"])
def test_worker_prepares_what_the_process_does(engine, pool, parts, tmp_path):
    made = parts(tmp_path) if parts.__code__.co_argcount else parts()
    parts_ = [Media("image", p) if isinstance(p, Image.Image) else p for p in made]
    request = ask(engine, *parts_, max_new_tokens=7)
    got = pool(request)
    assert got.request is request
    assert_same(got, engine.prepare(request))
    assert os.listdir(pool._folder) == []  # the result's file was read and removed


def test_generation_from_a_worker_equals_generate(engine, pool):
    request = ask(engine, Media("image", image(3)), "describe it", max_new_tokens=8, temperature=0)
    assert engine.submit(pool(request)).result().text == engine.generate(request).text


def test_errors_keep_their_status(engine, pool):
    with pytest.raises(RequestError) as err:
        pool(Request([Message("assistant", ["hi"])], engine.sampling()))
    assert (err.value.status, err.value.code, err.value.param) == (400, "invalid_request", "messages")
    with pytest.raises(RequestError) as err:
        pool(ask(engine, "word " * (engine.max_model_len + 10)))
    assert err.value.code == "context_length_exceeded" and "context is" in err.value.what


def test_a_resent_image_is_processed_once(engine, pool):
    before = pool.cache_stats()
    for _ in range(3):  # the same decoded image each turn: the same worker, its cache
        pool(ask(engine, Media("image", image(4, key="c0ffee")), "again"))
    after = pool.cache_stats()
    assert after["image_cache_misses"] - before.get("image_cache_misses", 0) == 1
    assert after["image_cache_hits"] - before.get("image_cache_hits", 0) == 2


def test_tensors_cross_as_numpy_and_bf16_as_torch():
    stream, buffers = prepare_pool.dumps({"f": torch.arange(6.0).view(2, 3), "i": torch.arange(4),
                                          "b": torch.ones(3, dtype=torch.bfloat16), "s": torch.arange(10)[::2]})
    back = prepare_pool._receive(b"".join(prepare_pool._frame(stream, buffers)))
    assert torch.equal(back["f"], torch.arange(6.0).view(2, 3)) and torch.equal(back["i"], torch.arange(4))
    assert back["b"].dtype == torch.bfloat16 and torch.equal(back["s"], torch.arange(0, 10, 2))
    back["f"] += 1  # writable


def test_a_dead_worker_is_replaced(engine):
    p = PreparePool(CrashingPreparer(engine.processor, engine.max_model_len), 1)
    try:
        with pytest.raises(RequestError) as err:  # it dies with this request: a 400 that says so
            p(ask(engine, "crash"))
        assert err.value.code == "preprocessing_crashed" and err.value.status == 400
        assert p(ask(engine, "fine")).prompt_tokens > 0 and p.restarts == 1
        pid = next(iter(p._workers[0]._processes))
        os.kill(pid, signal.SIGKILL)  # killed while idle: the next request is not failed for it
        deadline = time.time() + 10
        while time.time() < deadline and p._workers[0]._processes.get(pid) and \
                p._workers[0]._processes[pid].is_alive():
            time.sleep(0.05)
        assert p(ask(engine, "fine")).prompt_tokens > 0 and p.restarts == 2
    finally:
        p.close()


def test_tensors_come_back_aligned():
    """Each array starts at a 64-byte boundary in memory (ATen's vectorised kernels assume aligned data), whatever
    the lengths before it, inline or by file."""
    obj = [torch.arange(n, dtype=dtype) for n, dtype in ((3, torch.uint8), (5, torch.float32), (7, torch.int64),
                                                         (1, torch.float64))]
    data = b"".join(prepare_pool._frame(*prepare_pool.dumps(obj)))
    for _ in range(5):  # different allocations
        back = prepare_pool._receive(data)
        for a, b in zip(obj, back):
            assert torch.equal(a, b) and b.data_ptr() % 64 == 0


def test_a_queued_request_is_not_blamed_for_a_crash(engine):
    """Requests waiting for a worker while it dies on another's request are prepared by its replacement."""
    from concurrent.futures import ThreadPoolExecutor

    p = PreparePool(CrashingPreparer(engine.processor, engine.max_model_len), 1)
    try:
        with ThreadPoolExecutor(4) as threads:
            crash = threads.submit(p, ask(engine, "crash"))
            time.sleep(0.05)
            fine = [threads.submit(p, ask(engine, f"fine {i}")) for i in range(3)]
            with pytest.raises(RequestError):
                crash.result()
            assert all(f.result().prompt_tokens > 0 for f in fine)
    finally:
        p.close()
    with pytest.raises(RequestError) as err:  # closed: no worker is started again
        p(ask(engine, "late"))
    assert err.value.status == 503


def test_workers_end_with_their_server(tiny_model_dir):
    """A server killed outright (or ended by the signal uvicorn re-raises after its graceful shutdown, before its own
    clean-up runs) leaves no worker behind."""
    import subprocess
    import sys

    import textwrap

    script = textwrap.dedent(f"""
        import time
        from qvl.infer.transformers_backend import TransformersEngine
        from qvl.infer.prepare_pool import PreparePool
        if __name__ == "__main__":
            e = TransformersEngine.load({str(tiny_model_dir)!r}, device="cpu", say=lambda *a: None)
            p = PreparePool(e.preparer, 2)
            print(*[pid for w in p._workers for pid in w._processes], flush=True)
            time.sleep(600)
        """)
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in server.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        server.kill()
        server.wait()
    deadline = time.time() + 20
    alive = pids
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [pid for pid in pids if _running(pid)]
    assert not alive, f"workers {alive} outlived their server"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
