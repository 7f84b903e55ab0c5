"""A step that runs long says what it is doing while it runs: compiling what, or recording a CUDA graph.

The first step of a compiled run takes minutes on a cold compile cache (8B LoRA on an H200: 132 s, 128 s of it
compiling; docs/benchmarks.md), and other steps take seconds more when they meet a new row shape. The step's
own line only comes once it has finished, so without this the screen stood still for two minutes. A thread
looks every second; once a step has run ``after`` seconds it prints, every ``every`` seconds, how long the step
has run, what the process is doing now (read from the threads' Python stacks: the function dynamo is tracing,
inductor compiling a backward graph, a CUDA graph being recorded) and what compiled since the step began (dynamo's own per-function
times: :func:`qvl.train.compile.compiled_functions`).
"""

from __future__ import annotations

import sys
import threading
import time

# (path ending, function or None for any) of frames that show the process compiling: dynamo converting a frame
# (tracing it; its ``code`` local is the function) and inductor compiling a graph (where a backward graph compiles
# lazily too, on the autograd thread); recording: qvl's CUDA-graph recording of the decoder stack
_DYNAMO = ("torch/_dynamo/convert_frame.py", "_compile")
_COMPILING = (_DYNAMO, ("torch/_inductor/compile_fx.py", None))
_RECORDING = (("qvl/train/graphs.py", "_record"),)


def _is(frame: tuple, rules) -> bool:
    path, name = frame[0].replace("\\", "/"), frame[1]
    return any(path.endswith(end) and (want is None or name == want) for end, want in rules)


def doing(stacks: list[list[tuple]]) -> str:
    """What the process does now, from its threads' stacks (each a list of (file, function, what it compiles or
    None), outermost first): "compiling decoder layer", "recording a CUDA graph", "compiling a backward graph",
    or "" when none of that shows."""
    for stack in stacks:
        compiling = [f for f in stack if _is(f, (_DYNAMO,)) and f[2]]
        if compiling:
            return f"compiling {compiling[-1][2]}"
    for stack in stacks:
        if any(_is(f, _COMPILING) for f in stack):
            return "compiling a backward graph" if not any(_is(f, (_DYNAMO,)) for f in stack) else "compiling"
    for stack in stacks:
        if any(_is(f, _RECORDING) for f in stack):
            return "recording a CUDA graph"
    return ""


def _stacks() -> list[list[tuple]]:
    from qvl.train.compile import compiled_name

    out = []
    for frame in sys._current_frames().values():
        stack = []
        while frame is not None:
            code, what = frame.f_code, None
            if _is((code.co_filename, code.co_name), (_DYNAMO,)):
                target = frame.f_locals.get("code")  # the function dynamo is converting
                what = compiled_name(target.co_filename, target.co_firstlineno, target.co_name) \
                    if hasattr(target, "co_firstlineno") else None
            stack.append((code.co_filename, code.co_name, what))
            frame = frame.f_back
        out.append(stack[::-1])
    return out


class StepWatch:
    """``begin(step)`` when a step starts, ``end()`` when it is done; ``say`` gets the lines (the progress bar's
    writer). ``since()`` -> a marker and ``compiled(marker)`` -> [(what, seconds)]: what compiled since the step
    began (defaults: :mod:`qvl.train.compile`'s). ``close()`` stops the thread."""

    def __init__(self, say, after: float = 20.0, every: float = 20.0, since=None, compiled=None):
        if since is None or compiled is None:
            from qvl.train.compile import compile_marker, compiled_functions

            since, compiled = compile_marker, compiled_functions
        self.say, self.after, self.every, self._since_fn, self._compiled_fn = say, after, every, since, compiled
        self._lock = threading.Lock()
        self._step = None  # (step number, start time, marker, last line's time)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="qvl-step-watch", daemon=True)
        self._thread.start()

    def begin(self, step: int) -> None:
        marker = self._since_fn()
        with self._lock:
            self._step = [step, time.perf_counter(), marker, None]

    def end(self) -> None:
        with self._lock:
            self._step = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        tick = min(1.0, self.after, self.every)
        while not self._stop.wait(tick):
            with self._lock:
                if self._step is None:
                    continue
                step, start, marker, last = self._step
                now = time.perf_counter()
                if now - start < self.after or (last is not None and now - last < self.every):
                    continue
                self._step[3] = now
            self.say(self.line(step, now - start, doing(_stacks()), self._compiled_fn(marker)))

    @staticmethod
    def line(step: int, seconds: float, now_doing: str, compiled: list[tuple[str, float]]) -> str:
        """'step 1: 40 s so far, compiling vision tower (done: decoder layer 12 s)'."""
        text = f"step {step}: {seconds:.0f} s so far, " + (now_doing or "still running")
        if compiled:
            text += " (done: " + ", ".join(f"{what} {s:.0f} s" for what, s in compiled) + ")"
        return text
