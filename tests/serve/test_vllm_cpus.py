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
