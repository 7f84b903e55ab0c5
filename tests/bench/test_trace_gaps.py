"""bench/experiments/trace_gaps.py on a hand-made chrome trace: which gaps are the host's fault and what the host was doing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "experiments"))

from trace_gaps import gap_report  # noqa: E402


def op(cat, name, ts, dur, tid=1, corr=None):
    e = dict(ph="X", cat=cat, name=name, ts=ts, dur=dur, pid=1 if cat != "kernel" else 0, tid=tid)
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_gaps_are_split_into_launch_bound_and_queued(tmp_path):
    events = [
        op("cpu_op", "A", 0, 100), op("cuda_runtime", "cudaLaunchKernel", 50, 5, corr=1),
        op("kernel", "k1", 60, 20, tid=7, corr=1),
        op("cpu_op", "B (a compiled layer)", 100, 2000), op("cpu_op", "slow python", 110, 100),
        op("cuda_runtime", "cudaLaunchKernel", 250, 5, corr=2), op("kernel", "k2", 260, 40, tid=7, corr=2),
        # launched long before it ran: the GPU waited for something else
        op("cuda_runtime", "cudaLaunchKernel", 120, 5, corr=3), op("kernel", "k3", 400, 20, tid=7, corr=3),
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    report = gap_report(path)
    head, *lines = report.splitlines()
    assert "busy 0.1 ms" in head and "launch-bound 0.2 ms" in head and "queued but idle 0.1 ms" in head
    # the host op that held the launch of k2 is named with its enclosing >= 1 ms op
    assert any("slow python  [in B (a compiled layer)]" in line for line in lines)
    assert any("k2 -> k3" in line for line in lines)


def test_a_trace_without_kernels_says_so(tmp_path):
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": [op("cpu_op", "A", 0, 10)]}))
    assert gap_report(path) == "no GPU events in the trace"
