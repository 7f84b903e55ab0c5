"""``profile_steps``: torch.profiler over chosen optimizer steps of a run, to see where a step's time goes.

A run that is slower than it should be (the 8B YAML on an emulated 32 GB card ran at a fifth of its full-card rate,
2026-12-05, docs/benchmarks.md) needs to say whether the GPU was busy and with what, on the path the user runs. The
profiler starts before the first chosen step is built and stops once the last has finished on the GPU; the run
folder then holds ``profile.txt`` (how long the steps took, how much of it the GPU spent in kernels, the operators
by device time and by host time) and ``profile_trace.json.gz`` (for Perfetto / chrome://tracing). Profiling slows the
steps it covers a little; choose steps after warm-up.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import time
from pathlib import Path

from qvl.errors import QvlError

TOP_OPS = 30


def parse_steps(text: str) -> tuple[int, int]:
    """"12" -> (12, 12); "12-14" -> (12, 14): optimizer steps counted from 1, both ends included."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    a, b = (int(match[1]), int(match[2] or match[1])) if match else (0, 0)
    if not 1 <= a <= b:
        raise QvlError(f"profile_steps={text!r} is not a step or a range of steps", where="profile_steps",
                       fix="give optimizer steps counted from 1, e.g. profile_steps=12 or profile_steps=12-14 "
                           "(after warm-up: the steps whose line shows a tok/s)")
    return a, b


def busy_line(kernel_s: float, wall_s: float, steps: int) -> str:
    """The summary: the steps' wall time and the share of it the GPU spent in kernels."""
    share = kernel_s / wall_s if wall_s > 0 else 0.0
    return (f"{steps} step{'s' if steps > 1 else ''} in {wall_s:.2f} s ({wall_s / steps:.3f} s each); the GPU ran "
            f"kernels for {kernel_s:.2f} s of it ({share:.0%})" + (": the host is the slow side" if share < 0.8 else ""))


class StepProfiler:
    """Profiles steps ``first``..``last`` (:func:`parse_steps`): :meth:`begin` before a step is built, :meth:`end`
    once it is queued, :meth:`close` when the loop ends (also on an error: a profile still running is dropped)."""

    def __init__(self, steps: tuple[int, int], out: Path, device, say):
        self.first, self.last = steps
        self.out, self.device, self.say = Path(out), device, say
        self.prof, self.t0, self.done = None, 0.0, False

    def covers(self, step: int) -> bool:
        """Whether ``step``'s time is the profiler's: the profiled steps, and the one after them (the GPU waits
        while the profile is written)."""
        return self.first <= step <= self.last + 1

    def begin(self, step: int) -> None:
        if step != self.first or self.prof is not None:
            return
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if getattr(self.device, "type", "") == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize(self.device)  # the steps before it are not counted
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def end(self, step: int) -> None:
        if step != self.last or self.prof is None:
            return
        import torch

        cuda = getattr(self.device, "type", "") == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        wall = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.done = True
        self._write(prof, wall, cuda)

    def _write(self, prof, wall: float, cuda: bool) -> None:
        from qvl.utils.fs import atomic_write_text

        averages = prof.key_averages()
        kernel_s = (sum(getattr(e, "self_device_time_total", 0.0) for e in averages) / 1e6 if cuda else 0.0)
        steps = self.last - self.first + 1
        summary = busy_line(kernel_s, wall, steps) if cuda else f"{steps} step(s) in {wall:.2f} s (CPU: no GPU time)"
        tables = []
        if cuda:
            tables.append("by GPU time (self):\n" + averages.table(sort_by="self_device_time_total", row_limit=TOP_OPS))
        tables.append("by host time (self):\n" + averages.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS))
        text = (f"profile_steps {self.first}-{self.last}: {summary}\n\n" + "\n\n".join(tables) + "\n")
        atomic_write_text(self.out / "profile.txt", text)
        trace = self.out / "profile_trace.json"
        try:
            prof.export_chrome_trace(str(trace))
            with open(trace, "rb") as src, gzip.open(str(trace) + ".gz.tmp", "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(str(trace) + ".gz.tmp", str(trace) + ".gz")
            where = f"{self.out / 'profile.txt'}, {trace}.gz"
        except OSError as e:  # a full disk loses the trace, not the run
            where = f"{self.out / 'profile.txt'} (the trace was not written: {e})"
        finally:
            trace.unlink(missing_ok=True)
        self.say(f"profile: {summary}; {where}")

    def close(self) -> None:
        if self.prof is not None:  # the loop stopped inside the profiled steps
            self.prof.__exit__(None, None, None)
            self.prof = None
            self.say(f"profile_steps {self.first}-{self.last}: the run stopped before step {self.last}; nothing "
                     "written")
        elif not self.done:
            self.say(f"profile_steps {self.first}-{self.last}: the run did not reach step {self.first}")
