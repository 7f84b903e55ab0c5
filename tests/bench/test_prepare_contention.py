"""bench/experiments/prepare_contention.py runs end to end on a CPU: every mode completes every request."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_prepare_contention_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "experiments" / "prepare_contention.py"), "--model",
                        str(tiny_model_dir), "--device", "cpu", "--clients", "3", "--tokens", "4", "--image", "64",
                        "--repeats", "1", "--max-model-len", "256", "--kv-cache-gib", "0.05", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    for mode in ("before", "threads", "workers"):
        assert rows[mode][0]["completed"] == 3 and rows[mode][0]["output_tok_s"] > 0, rows
