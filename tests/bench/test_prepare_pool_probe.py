"""bench/experiments/prepare_pool_probe.py runs end to end on a CPU: qvl serve's app on the stand-in engine, with
requests prepared in the server's process and by a worker, every request answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prepare_pool_probe_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "experiments" / "prepare_pool_probe.py"), "--model",
                        str(tiny_model_dir), "--clients", "3", "--tokens", "4", "--image", "64", "--repeats", "1",
                        "--workers", "0,1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["workers"] for row in rows] == [0, 1]
    for row in rows:
        assert row["errors"] == 0 and row["output_tok_s"] > 0 and row["engine_steps"] >= 4, row
