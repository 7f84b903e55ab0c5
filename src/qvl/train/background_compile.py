"""A compiled function whose cold compile runs in a thread while its callers run the plain function.

The frozen vision tower's compile was the largest part of the wait for ``qvl train``'s first step (the 8B LoRA
YAML on an H200, 2026-12-05: 128 s compiling in the first step, ~72 s of it the tower; docs/benchmarks.md). The
tower gives the same output compiled or not, so the steps need not wait for it: :class:`CompileInBackground` runs
the plain tower until :meth:`~CompileInBackground.start` (called by the loop once the first step, which compiles
the decoder layers, is done) has compiled it in a thread on a copy of the first call's inputs; calls after that run
the compiled code. Dynamo compiles one function at a time in a process, so starting before the decoder layers have
compiled would hold their compile back.

The thread sets the caller's grad mode, autocast and CUDA device (all per thread in torch) before it compiles:
they are in the compiled code's guards, and a mismatch would compile again on the training thread. And dynamo puts
the process's torch random states (CPU and CUDA: one for all threads) back as they were when its compile began:
done from the thread, that would rewind the training thread's generators by the steps run meanwhile (their LoRA
dropout masks drawn again). The thread's own calls to those setters are skipped instead: it draws no random numbers.
(torch 2.14 puts Python's ``random`` state back from C, out of reach: qvl's training process draws nothing from it.)

Tracing in one thread is seen by the other: on torch 2.11 fx's "tracing now" flag is one for the process, and a
compiled function called while it is up (the decoder layers, on the training thread) refuses to run ("Detected
that you are using FX to symbolically trace a dynamo-optimized function"); dynamo's
``force_compile_during_fx_trace`` lets those calls through while the thread compiles. :func:`supported` says
whether this torch has one of the two (no background compile otherwise). And while the compile traces, fx wraps
``nn.Module.__call__`` for the whole process: the training thread's module calls are slower then, not different.

The two threads share one interpreter lock. Every torch op and kernel launch on the training thread lets go of it
and then waits for it while the compile (pure Python for tens of seconds) holds it, up to the interpreter's switch
interval (5 ms) each time: on an H100, 2026-12-05, the second step ended only when the tower's compile did. On a
2-core CPU (2026-12-05, ``torch.add`` on 8 floats in a loop against a thread counting in Python), the ops ran at
0.5 % of their speed alone at 5 ms, 5.3 % at 0.1 ms; the counting thread kept 98 % and 85 % of its speed. So the
interval is :data:`SWITCH_INTERVAL_S` while the thread compiles.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import torch


# the interpreter's switch interval while a thread compiles (see the module's notes); Python's default is 5 ms
SWITCH_INTERVAL_S = 1e-4


_switch_lock = threading.Lock()
_switch = {"inside": 0, "before": 0.0}  # compiles now inside _switch_interval, and the interval before the first


@contextlib.contextmanager
def _switch_interval(seconds: float):
    """While inside: a thread waiting for the interpreter lock gets it after ``seconds`` (for the whole process);
    overlapping compiles put the interval before back when the last of them leaves."""
    with _switch_lock:
        if not _switch["inside"]:
            _switch["before"] = sys.getswitchinterval()
        _switch["inside"] += 1
        sys.setswitchinterval(min(seconds, _switch["before"]))
    try:
        yield
    finally:
        with _switch_lock:
            _switch["inside"] -= 1
            if not _switch["inside"]:
                sys.setswitchinterval(_switch["before"])


def _copied(value):
    """``value`` with every tensor in it detached and cloned (tuples, lists and dicts followed)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    return value


def _first_device(value) -> torch.device | None:
    if isinstance(value, torch.Tensor):
        return value.device
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((d for d in map(_first_device, items) if d is not None), None)


def supported() -> bool:
    """This torch lets one thread compile while another runs compiled code: its fx tracing flag is per thread, or
    dynamo can be told to run compiled code while it is up."""
    import torch._dynamo.config as dynamo_config
    import torch.fx._symbolic_trace as fx_trace

    return hasattr(fx_trace, "_is_fx_tracing_tls") or hasattr(dynamo_config, "force_compile_during_fx_trace")


@contextlib.contextmanager
def _others_run_compiled_code():
    """While inside: compiled functions called by other threads run while this one traces (see the module's notes)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx._symbolic_trace as fx_trace

    if hasattr(fx_trace, "_is_fx_tracing_tls") or not hasattr(dynamo_config, "force_compile_during_fx_trace"):
        yield
        return
    with dynamo_config.patch(force_compile_during_fx_trace=True):
        yield


def _thread_state(device: torch.device | None) -> dict:
    """The per-thread state a compiled function's guards read: grad mode and autocast (this thread's)."""
    kind = device.type if device is not None else "cpu"
    return {"device": device, "grad": torch.is_grad_enabled(), "kind": kind,
            "autocast": torch.is_autocast_enabled(kind), "dtype": torch.get_autocast_dtype(kind),
            "cache": torch.is_autocast_cache_enabled()}


@contextlib.contextmanager
def _in_state(state: dict):
    with contextlib.ExitStack() as stack:
        device = state["device"]
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)
        stack.enter_context(torch.set_grad_enabled(state["grad"]))
        if state["autocast"]:
            stack.enter_context(torch.autocast(state["kind"], dtype=state["dtype"], cache_enabled=state["cache"]))
        yield


# (module, name) of the process-wide random-state setters dynamo's compile calls when it ends
_RNG_SETTERS = (("torch.random", "set_rng_state"), ("torch", "set_rng_state"), ("torch.cuda", "set_rng_state"),
                ("random", "setstate"))


@contextlib.contextmanager
def _rng_kept_from(thread: threading.Thread):
    """While inside: the random-state setters do nothing when ``thread`` calls them (other threads' calls go through)."""
    import importlib

    saved = []
    for module_name, name in _RNG_SETTERS:
        module = importlib.import_module(module_name)
        setter = getattr(module, name, None)
        if setter is None:
            continue

        def kept(*args, _setter=setter, **kwargs):
            if threading.current_thread() is not thread:
                return _setter(*args, **kwargs)

        saved.append((module, name, setter))
        setattr(module, name, kept)
    try:
        yield
    finally:
        for module, name, setter in saved:
            setattr(module, name, setter)


class CompileInBackground:
    """``f(*args, **kwargs)``: ``eager`` until ``compiled`` has compiled in a thread (:meth:`start`), then
    ``compiled``. ``what`` names it in the log ("the vision tower")."""

    def __init__(self, compiled, eager, what: str):
        self.compiled, self.eager, self.what = compiled, eager, what
        self.done = threading.Event()
        self.error = ""  # why the compile failed ('' if it did not): the calls stay eager
        self.seconds = 0.0  # how long the compile took, once done
        self.compiled_calls = self.eager_calls = 0
        self._example = None  # the first call's inputs, copied, and its thread state
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def __call__(self, *args, **kwargs):
        if self.done.is_set() and not self.error:
            self.compiled_calls += 1
            return self.compiled(*args, **kwargs)
        if self._example is None and self._thread is None:
            self._example = (_copied(args), _copied(kwargs), _thread_state(_first_device((args, kwargs))))
        self.eager_calls += 1
        return self.eager(*args, **kwargs)

    @property
    def started(self) -> bool:
        return self._thread is not None

    @property
    def compiling(self) -> bool:
        return self._thread is not None and not self.done.is_set()

    def start(self) -> bool:
        """Compile now, in a thread, on the first call's inputs. False when it has started already or nothing has
        called it yet (a text-only first step: the next step tries again)."""
        if self._thread is not None or self._example is None:
            return False
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._compile, name=f"qvl: compiling {self.what}", daemon=True)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a started compile (at most ``timeout`` s); True once it is done."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.done.is_set()

    def _compile(self) -> None:
        from torch._dynamo.utils import counters

        args, kwargs, state = self._example
        graphs = counters["stats"]["unique_graphs"]
        try:
            with (_in_state(state), _rng_kept_from(threading.current_thread()), _others_run_compiled_code(),
                  _switch_interval(SWITCH_INTERVAL_S)):
                self.compiled(*args, **kwargs)
                if state["device"] is not None and state["device"].type == "cuda":
                    torch.cuda.current_stream().synchronize()
            if counters["stats"]["unique_graphs"] == graphs:  # dynamo gave up quietly (suppress_errors): eager
                self.error = "torch.compile made no graph of it"
        except Exception as e:  # noqa: BLE001 -- the calls stay eager; the loop says why
            while (e.__cause__ or getattr(e, "inner_exception", None)) is not None:  # dynamo wraps the backend's
                e = e.__cause__ or e.inner_exception
            first = str(e).strip().splitlines()
            self.error = f"{type(e).__name__}: {first[0] if first else ''}".rstrip(": ")
        finally:
            self._example = None
            self.seconds = time.perf_counter() - self._started
            self.done.set()

    def status(self) -> str:
        """One line on where the compile is, for the log."""
        if self._thread is None:
            return f"{self.what} runs uncompiled until its compile starts (after the first step with media)"
        if not self.done.is_set():
            return (f"{self.what} compiling in the background for {time.perf_counter() - self._started:.0f} s "
                    "(the steps run it uncompiled meanwhile)")
        if self.error:
            return f"{self.what} could not compile ({self.error}): it runs uncompiled"
        return f"{self.what} compiled in the background in {self.seconds:.0f} s"
