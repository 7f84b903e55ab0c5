"""`qvl serve --backend vllm` on a CPU build keeps its threads off the CPUs vLLM binds its workers to (where they spin
between steps and hold back the server's socket writes: the stream reached the client in one block)."""

from __future__ import annotations

from qvl.infer.vllm_backend import cpus_to_keep


def test_the_workers_cpus_are_left():
    assert cpus_to_keep({0, 1}, [{0, 1}, {0}]) == {1}  # the engine core floats; the worker is bound to CPU 0
    assert cpus_to_keep({0, 1, 2, 3}, [{0, 1}, {2}]) == {3}  # two workers


def test_nothing_changes_without_a_bound_worker_or_a_cpu_to_spare():
    assert cpus_to_keep({0, 1}, [{0, 1}, {0, 1}]) is None  # nobody bound (GPU, VLLM_CPU_OMP_THREADS_BIND=nobind)
    assert cpus_to_keep({0, 1}, []) is None
    assert cpus_to_keep({0}, [{0}]) is None  # one CPU: nowhere else to go
    assert cpus_to_keep({0, 1}, [{0}, {1}]) is None  # workers on every CPU: stay
    assert cpus_to_keep({2, 3}, [{0, 1}]) is None  # bound elsewhere (not ours): no overlap to avoid


def test_a_workers_threads_each_bound_to_their_own_cpu_are_all_left():
    """vLLM binds each OpenMP thread of a worker to its own CPU: the threads' sets, not the process's, say which."""
    threads = [{0, 1, 2, 3, 4, 5, 6, 7}, {0}, {1}, {2}, {3}, {0, 1, 2, 3, 4, 5, 6, 7}]  # engine core, worker threads
    assert cpus_to_keep(set(range(8)), threads) == {4, 5, 6, 7}


def test_the_server_moves_off_a_bound_worker_and_takes_the_childs_loose_threads_there():
    """A child like vLLM's CPU engine: one thread bound to a CPU (a worker's OpenMP thread), its main thread loose
    (the engine core's loop, which polls without end). This process moves off the bound CPU, and the loose thread
    moves onto it, so nothing of the child spins where the server writes its streams."""
    import os
    import subprocess
    import sys
    import time

    import pytest

    from qvl.infer.vllm_backend import keep_off_worker_cpus

    mine = os.sched_getaffinity(0)
    if len(mine) < 2:
        pytest.skip("needs 2 CPUs")
    bound = min(mine)
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, threading, time\n"
        f"def work():\n    os.sched_setaffinity(0, {{{bound}}})\n    time.sleep(60)\n"
        "threading.Thread(target=work, daemon=True).start()\ntime.sleep(60)\n")])
    try:
        for _ in range(100):  # until the child's thread has bound itself
            tids = os.listdir(f"/proc/{child.pid}/task")
            if any(os.sched_getaffinity(int(t)) == {bound} for t in tids):
                break
            time.sleep(0.05)
        kept, left = keep_off_worker_cpus()
        assert left == {bound} and kept == mine - {bound} and os.sched_getaffinity(0) == kept
        assert {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir(f"/proc/{child.pid}/task")} == \
            {frozenset({bound})}
    finally:
        child.kill()
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(tid), mine)
            except OSError:
                pass
