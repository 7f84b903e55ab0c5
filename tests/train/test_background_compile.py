"""qvl.train.background_compile: a function compiled in a thread while its callers run it uncompiled -- the same
results, the caller's grad mode and autocast carried into the thread, and the training thread's random state not
rewound by the compile's end (dynamo puts the process's generators back as they were when its compile began)."""

from __future__ import annotations

import threading

import torch

from qvl.train.background_compile import CompileInBackground


def scaled(x, w):
    return torch.tanh(x @ w) * 2


def test_runs_uncompiled_until_compiled_then_compiled_with_the_same_result():
    compiles = []

    def backend(gm, inputs):
        compiles.append(threading.current_thread().name)
        return gm.forward

    f = CompileInBackground(torch.compile(scaled, backend=backend, dynamic=True), scaled, "f")
    x, w = torch.randn(5, 3), torch.randn(3, 4)
    assert not f.start()  # nothing called yet: nothing to compile with
    assert "until its compile starts" in f.status()
    first = f(x, w)
    assert (f.eager_calls, f.compiled_calls, compiles) == (1, 0, [])
    assert f.start() and f.wait(timeout=120) and f.error == ""
    assert compiles == ["qvl: compiling f"]  # in its own thread
    assert torch.equal(f(x, w), first) and f.compiled_calls == 1
    assert torch.equal(f(torch.ones(7, 3), w), scaled(torch.ones(7, 3), w))  # another size: the dynamic graph
    assert len(compiles) == 1 and "compiled in the background" in f.status()


def test_the_callers_grad_mode_and_autocast_go_into_the_thread():
    """Both are per thread and in the compiled code's guards: compiled under other settings, the caller's first
    compiled call would compile again."""
    compiles = []
    f = CompileInBackground(torch.compile(scaled, backend=lambda gm, inputs: compiles.append(1) or gm.forward),
                            scaled, "f")
    x, w = torch.randn(4, 3), torch.randn(3, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        f(x, w)
        assert f.start() and f.wait(timeout=120)
        out = f(x, w)
    assert out.dtype == torch.bfloat16 and not out.requires_grad
    assert len(compiles) == 1 and f.compiled_calls == 1


def test_a_failed_compile_leaves_the_calls_uncompiled_and_says_why():
    def backend(gm, inputs):
        raise RuntimeError("no kernels for you\nmore lines")

    f = CompileInBackground(torch.compile(scaled, backend=backend), scaled, "the tower")
    x, w = torch.randn(2, 3), torch.randn(3, 2)
    f(x, w)
    assert f.start() and f.wait(timeout=120)
    assert "no kernels for you" in f.error and "more lines" not in f.error
    assert torch.equal(f(x, w), scaled(x, w)) and f.compiled_calls == 0
    assert f.status().startswith("the tower could not compile")


def test_the_compile_does_not_rewind_the_training_threads_random_numbers():
    """The compile begins (dynamo notes the generators' state), the training thread draws numbers, the compile ends:
    the thread's next numbers continue the sequence; they do not repeat the ones drawn meanwhile."""
    began, go_on = threading.Event(), threading.Event()

    def backend(gm, inputs):
        began.set()
        assert go_on.wait(60)
        return gm.forward

    f = CompileInBackground(torch.compile(scaled, backend=backend), scaled, "f")
    x, w = torch.randn(2, 3), torch.randn(3, 2)
    f(x, w)
    torch.manual_seed(7)
    expected = torch.rand(8)
    torch.manual_seed(7)
    assert f.start() and began.wait(60)
    meanwhile = torch.rand(4)
    go_on.set()
    assert f.wait(timeout=120) and f.error == ""
    after = torch.rand(4)
    assert torch.equal(torch.cat([meanwhile, after]), expected)
    assert torch.random.set_rng_state.__module__ == "torch.random"  # the setters are torch's own again


def test_compiled_code_runs_on_the_training_thread_while_the_other_one_traces():
    """On torch 2.11 fx's tracing flag is one for the process: without dynamo's force_compile_during_fx_trace a
    compiled layer called meanwhile refused to run ("Detected that you are using FX to symbolically trace a
    dynamo-optimized function"). The layer keeps running, with its own results."""
    import time

    from qvl.train.background_compile import supported

    assert supported()
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU()) for _ in range(30)])
    net.requires_grad_(False)
    f = CompileInBackground(torch.compile(net, backend="aot_eager", dynamic=True), net, "the tower")
    f(torch.randn(4, 16))
    layer = torch.nn.Linear(8, 8)
    layer.compile(backend="aot_eager", dynamic=True)
    z = torch.randn(3, 8)
    expected = layer(z)  # compiled on this thread first, as the first step compiles the decoder layers
    assert f.start()
    calls, failures = 0, []
    while not f.done.is_set():
        try:
            assert torch.equal(layer(z), expected)
            calls += 1
        except RuntimeError as e:
            failures.append(str(e)[:100])
        time.sleep(0.001)
    assert f.error == "" and calls > 0 and failures == []


def test_the_switch_interval_is_short_while_the_thread_compiles_and_put_back_after():
    """The training thread waits for the interpreter lock after each op while the compile holds it: the wait is
    short only while the compile runs."""
    import sys

    from qvl.train import background_compile

    seen = []

    def compiled(x):
        seen.append(sys.getswitchinterval())
        return x

    before = sys.getswitchinterval()
    f = CompileInBackground(compiled, lambda x: x, "f")
    f(torch.ones(2))
    assert f.start() and f.wait(timeout=60)
    assert len(seen) == 1 and abs(seen[0] - background_compile.SWITCH_INTERVAL_S) < 1e-9 < before - seen[0]
    assert sys.getswitchinterval() == before


def test_overlapping_compiles_put_the_switch_interval_back_once_the_last_leaves():
    import sys

    from qvl.train.background_compile import _switch_interval

    before = sys.getswitchinterval()
    a, b = _switch_interval(1e-4), _switch_interval(1e-4)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # out of order: b still compiles
    assert abs(sys.getswitchinterval() - 1e-4) < 1e-9
    b.__exit__(None, None, None)
    assert sys.getswitchinterval() == before
