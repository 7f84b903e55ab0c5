"""bench/experiments/moe_kernel_tune.py runs end to end on a CPU (Triton's interpreter, a tiny shape, eager timings):
every variant timed, each kernel's best tile named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_moe_kernel_tune_smoke(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "t.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "experiments" / "moe_kernel_tune.py"), "--device", "cpu",
                        "--experts", "8", "--hidden", "64", "--inter", "32", "--top-k", "2", "--layers", "2", "--rows",
                        "1,2", "--block-out", "16,32", "--block-in", "32", "--warps", "4", "--json", str(out)],
                       env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"1", "2"}
    for row in rows.values():
        assert {"grouped", "gathered", "fused/default", "fused/best", "gate_up/16x32/w4", "gate_up/32x32/w4",
                "down/16x32/w4", "down/32x32/w4", "down_sum/16x32/w4", "down_sum/32x32/w4", "added/after",
                "added/in_down"} <= set(row["us"])
        assert set(row["best_tiles"]) == {"gate_up", "down", "down_sum"}
        assert row["best_tiles"]["down"] in ("16x32/w4", "32x32/w4")
        assert row["best_fused"] in row["us"]
        assert set(row["route_us"]) == {"router_top_k", "route_kernel", "route_then_experts", "routed_in_gate_up"}
    assert "GATE_UP_TILE = (" in r.stdout and "DOWN_TILE = (" in r.stdout and "DOWN_SUM_TILE = (" in r.stdout
