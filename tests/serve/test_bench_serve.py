"""bench/serve.py runs end to end on the CPU (--smoke): the real `qvl serve` in its own process, async
streaming clients, the engine-level rows and the two-turn conversation, all written to its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_serve_smoke(tiny_model_dir, tmp_path):
    out = tmp_path / "serve.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "serve.py"), "--smoke", "--model", str(tiny_model_dir),
                        "--json", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"].startswith("python bench/serve.py --smoke") and res["versions"]["torch"] and res["date"]
    for phase in ("http", "engine"):
        for row in ("clients_1", "clients_4", "rate_20"):
            s = res[phase][row]
            assert s["errors"] == 0 and s["completed"] == s["requests"], (phase, row, s)
            assert s["output_tokens"] == s["requests"] * 6 and s["output_tok_s"] > 0
            assert s["ttft_p50_s"] > 0 and s["tpot_p50_s"] > 0 and s["itl_p99_s"] >= s["itl_p50_s"]
    assert set(res["http_vs_engine"]) == {"clients_1", "clients_4", "rate_20"}
    assert res["turns"]["turn1_ttft_s"] > 0 and res["turns"]["turn2_ttft_s"] > 0
    assert res["server_alive_after"] is True
    assert (tmp_path / "server.log").exists()
