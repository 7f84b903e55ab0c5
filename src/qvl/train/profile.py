"""``profile_steps``: torch.profiler over chosen optimizer steps of a run, to see where a step's time goes.

A run that is slower than it should be (the 8B YAML on an emulated 32 GB card ran at a fifth of its full-card rate,
2026-12-05, docs/benchmarks.md) needs to say whether the GPU was busy and with what, on the path the user runs. The
profiler starts before the first chosen step is built and stops once the last has finished on the GPU; the run
folder then holds ``profile.txt`` (how long the steps took, how much of it the GPU spent in kernels, the operators
by device time and by host time) and ``profile_trace.json.gz`` (for Perfetto / chrome://tracing). Profiling slows the
steps it covers a little; choose steps after warm-up. A profile that cannot be taken or written is said in one line:
it never stops the run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from qvl.errors import QvlError

TOP_OPS = 30


def parse_steps(text) -> tuple[int, int]:
    """"12" (or 12) -> (12, 12); "12-14" -> (12, 14): optimizer steps counted from 1, both ends included."""
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


def kernel_seconds(averages) -> float:
    """The GPU's kernel time in a profile's ``key_averages()``: the device's own events only (a kernel's time is
    also counted in the operator that launched it, and a user-annotated range spans kernels already counted)."""
    from torch.autograd import DeviceType

    return sum(e.self_device_time_total for e in averages
               if getattr(e, "device_type", None) == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
               ) / 1e6


class StepProfiler:
    """Profiles steps ``first``..``last`` (:func:`parse_steps`) of a run that starts after ``start_step``:
    :meth:`begin` before a step is built, :meth:`end` once it is queued, :meth:`close` when the loop ends (also on an
    error). A run resumed inside the range profiles what is left of it."""

    def __init__(self, steps: tuple[int, int], out: Path, device, say, start_step: int = 0):
        self.first, self.last = steps
        self.out, self.device, self.say, self.start_step = Path(out), device, say, start_step
        self.prof, self.t0, self.began, self.done = None, 0.0, None, False
        self.cuda = getattr(device, "type", "") == "cuda"

    def covers(self, step: int) -> bool:
        """Whether ``step``'s time is the profiler's: the profiled steps, and the one after them (the GPU waits
        while the profile is written)."""
        return self.began is not None and self.began <= step <= self.last + 1

    def begin(self, step: int) -> None:
        if self.began is not None or self.done or not self.first <= step <= self.last:
            return
        import torch

        try:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize(self.device)  # the steps before it are not counted
            prof = torch.profiler.profile(activities=activities)
            prof.__enter__()
        except Exception as e:  # the profiler's own failure is said, never the run's end
            self.done = True
            self.say(f"profile_steps {self.first}-{self.last}: the profiler did not start ({e}); training goes on")
            return
        self.prof, self.began, self.t0 = prof, step, time.perf_counter()

    def end(self, step: int) -> None:
        if step != self.last or self.prof is None:
            return
        import torch

        prof, self.prof, self.done = self.prof, None, True
        try:
            if self.cuda:
                torch.cuda.synchronize(self.device)
            wall = time.perf_counter() - self.t0
            prof.__exit__(None, None, None)
            self._write(prof, wall, step - self.began + 1)
        except Exception as e:
            self.say(f"profile_steps {self.first}-{self.last}: the profile was not written ({e}); training goes on")

    def _write(self, prof, wall: float, steps: int) -> None:
        from qvl.utils.fs import atomic_write_text

        averages = prof.key_averages()
        summary = (busy_line(kernel_seconds(averages), wall, steps) if self.cuda
                   else f"{steps} step(s) in {wall:.2f} s (CPU: no GPU time)")
        tables = []
        if self.cuda:
            tables.append("by GPU time (self):\n" + averages.table(sort_by="self_device_time_total", row_limit=TOP_OPS))
        tables.append("by host time (self):\n" + averages.table(sort_by="self_cpu_time_total", row_limit=TOP_OPS))
        atomic_write_text(self.out / "profile.txt",
                          f"profile_steps {self.began}-{self.last}: {summary}\n\n" + "\n\n".join(tables) + "\n")
        trace, partial = self.out / "profile_trace.json.gz", self.out / "profile_trace.partial.json.gz"
        try:
            prof.export_chrome_trace(str(partial))  # gzipped by torch (the name ends in .gz)
            os.replace(partial, trace)
            where = f"{self.out / 'profile.txt'}, {trace}"
        except Exception as e:  # a full disk loses the trace, not the table
            where = f"{self.out / 'profile.txt'} (the trace was not written: {e})"
        finally:
            partial.unlink(missing_ok=True)
        self.say(f"profile: {summary}; {where}")

    def close(self) -> None:
        if self.prof is not None:  # the loop stopped inside the profiled steps
            prof, self.prof = self.prof, None
            try:
                prof.__exit__(None, None, None)
            except Exception:
                pass
            self.say(f"profile_steps {self.first}-{self.last}: the run stopped before step {self.last}; nothing "
                     "written")
        elif not self.done:
            self.say(f"profile_steps {self.first}-{self.last}: " +
                     (f"the run resumed after step {self.last}" if self.start_step >= self.last
                      else f"the run did not reach step {self.first}"))
