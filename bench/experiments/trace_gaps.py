"""Where the GPU waits: idle gaps between kernels in a torch.profiler chrome trace, and what the host did meanwhile.

    python bench/experiments/trace_gaps.py trace.json          # or: from trace_gaps import gap_report

A step can be slower than its kernels for two reasons, and the remedy differs:
  - **launch-bound**: the kernel after a gap was launched during the gap (the GPU had nothing queued and waited for
    the host). The report samples what the launching thread was doing in those gaps (innermost profiler op), so the
    host work to remove is named.
  - **queued, still idle**: the kernel after the gap had been launched before the gap began. The GPU waited for
    something else (a stream or event dependency, a copy, a graph upload). The report names the neighbouring kernels.
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import Counter
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST_CATS = {"cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function"}


def _short(name: str, n: int = 70) -> str:
    return name if len(name) <= n else name[: n - 3] + "..."


def load_events(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]


class HostThread:
    """One thread's profiler ops, for "which op was innermost at time t" (nested ops: the latest-started one that
    still covers t)."""

    def __init__(self, events: list[dict], long_us: float = 1000.0):
        self.events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
        self.starts = [e["ts"] for e in self.events]
        self.long = [e for e in self.events if e["dur"] >= long_us]  # few: scanned whole

    def innermost(self, t: float, limit: int = 5000) -> dict | None:
        i = bisect.bisect_right(self.starts, t) - 1
        for j in range(i, max(-1, i - limit), -1):
            e = self.events[j]
            if e["ts"] + e["dur"] >= t:
                return e
        return None

    def context(self, t: float) -> dict | None:
        """The innermost op of >= 1 ms covering ``t`` (a compiled graph's call, a replay, the optimizer step)."""
        covering = [e for e in self.long if e["ts"] <= t <= e["ts"] + e["dur"]]
        return covering[-1] if covering else None


def gap_report(path: str | Path, min_gap_us: float = 5.0, sample_us: float = 5.0, top: int = 25) -> str:
    events = load_events(path)
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU events in the trace"
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    threads: dict = {}
    for e in events:
        if e.get("cat") in HOST_CATS:
            threads.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    hosts = {k: HostThread(v) for k, v in threads.items()}

    t0, t_end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    busy, end = 0.0, t0
    launch_bound, queued = 0.0, 0.0
    waiting_on: Counter = Counter()  # host op (innermost) sampled during launch-bound gaps, in us
    queued_between: Counter = Counter()
    n_gaps = 0
    prev_name = "(start)"
    for e in gpu:
        start, stop = e["ts"], e["ts"] + e["dur"]
        gap = start - end
        if gap >= min_gap_us:
            n_gaps += 1
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is not None and launch["ts"] + launch["dur"] > end:  # launched during the gap
                launch_bound += gap
                host = hosts.get((launch.get("pid"), launch.get("tid")))
                t = end
                while host is not None and t < start:
                    op, ctx = host.innermost(t), host.context(t)
                    name = _short(op["name"], 45) if op else "(no profiled op: Python)"
                    within = _short(ctx["name"], 45) if ctx is not None and ctx is not op else "-"
                    waiting_on[f"{name}  [in {within}]"] += min(sample_us, start - t)
                    t += sample_us
            else:
                queued += gap
                queued_between[f"{_short(prev_name, 40)} -> {_short(e['name'], 40)}"] += gap
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
        prev_name = e["name"]
    wall = t_end - t0
    lines = [f"GPU timeline {wall / 1e3:.1f} ms: busy {busy / 1e3:.1f} ms ({busy / wall:.0%}), idle in {n_gaps} gaps of "
             f">= {min_gap_us:g} us: launch-bound {launch_bound / 1e3:.1f} ms, queued but idle {queued / 1e3:.1f} ms",
             "launch-bound gaps: what the launching thread was doing (innermost op, sampled every "
             f"{sample_us:g} us):"]
    lines += [f"  {us / 1e3:8.1f} ms  {name}" for name, us in waiting_on.most_common(top)]
    lines.append("queued-but-idle gaps, by the kernels around them:")
    lines += [f"  {us / 1e3:8.1f} ms  {name}" for name, us in queued_between.most_common(top // 2)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(gap_report(sys.argv[1]))
