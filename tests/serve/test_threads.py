"""qvl.serve.threads: a window of thread sampling says which thread spent the CPU time and where; the server opens
and closes one over /debug/threads."""

from __future__ import annotations

import threading
import time

import httpx
from serve_helpers import ScriptedEngine

from qvl.serve.threads import ThreadSampler, cpu_seconds


def spin(stop: list) -> None:
    n = 0
    while not stop:
        n += 1


def test_the_busy_thread_is_the_one_with_the_cpu_time_and_its_function_is_named():
    stop, idle_stop = [], threading.Event()
    busy = threading.Thread(target=spin, args=(stop,), name="busy")
    idle = threading.Thread(target=idle_stop.wait, name="idle")
    sampler = ThreadSampler(interval=0.002)
    busy.start()
    idle.start()
    try:
        sampler.start()
        time.sleep(0.5)
        got = sampler.stop()
    finally:
        stop.append(True)
        idle_stop.set()
        busy.join()
        idle.join()
    threads = {t["name"]: t for t in got["threads"]}
    assert got["samples"] > 20 and 0.4 < got["seconds"] < 5
    assert "qvl-thread-sampler" not in threads
    if cpu_seconds(threading.main_thread().native_id) is not None:  # Linux
        assert threads["busy"]["cpu_s"] > threads["idle"]["cpu_s"]
        assert got["threads"][0]["name"] in ("busy", "MainThread")  # busiest first
    assert threads["busy"]["in"][0][0] == "test_threads.py:spin" and threads["busy"]["in"][0][1] > 0.5
    assert threads["idle"]["in"][0][0].startswith("threading.py:")
    assert sampler.stop() == {}  # closed: nothing more


def test_the_server_samples_its_threads_between_post_and_get(serve):
    server = serve(ScriptedEngine("one two three"), api_key="k")
    key = {"Authorization": "Bearer k"}
    assert httpx.post(server.url + "/debug/threads", timeout=5).status_code == 401
    r = httpx.get(server.url + "/debug/threads", headers=key, timeout=5)
    assert r.status_code == 409 and "POST /debug/threads" in r.json()["error"]["message"]
    assert httpx.post(server.url + "/debug/threads", headers=key, timeout=5).json()["started"] is True
    time.sleep(0.2)
    got = httpx.get(server.url + "/debug/threads", headers=key, timeout=5).json()
    assert got["samples"] > 5 and got["threads"] and {"name", "cpu_s", "in", "in_qvl"} <= set(got["threads"][0])


def test_a_window_left_open_stops_sampling_on_its_own():
    sampler = ThreadSampler(interval=0.002, max_seconds=0.05)
    sampler.start()
    time.sleep(0.4)
    got = sampler.stop()
    assert got["seconds"] < 0.3 and got["samples"] < 60
