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
