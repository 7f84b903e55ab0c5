"""Real vLLM start-up figures for Qwen3-VL, beside what `qvl plan serve` predicts (needs a GPU and vLLM installed).

Builds the official Qwen3-VL shape with random weights (`qvl model random`, no download), starts `vllm serve` on
it under a few settings (127.0.0.1, one at a time), reads the start-up log's memory lines and writes one case per
setting in the format of tests/plan/vllm_logs.json, with the planner's prediction for the same card, version and
settings next to it:

    python bench/vllm_startup.py --out bench/results/vllm_startup            # 8B, three settings
    python bench/vllm_startup.py --size 4B --settings 32768:0.9 262144:0.3 --out /tmp/v

A setting is MAX_MODEL_LEN:GPU_MEMORY_UTILIZATION[:MAX_NUM_SEQS]. A low utilisation on a large card stands in for
a smaller card (0.22 of an H200 is an RTX 5090's 31.4 GiB budget). Each server is stopped once it reports ready
(or fails, or --timeout passes); the raw logs are kept beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

PATTERNS = {  # vLLM's start-up lines (V1, 0.11+): the figure each gives
    "weights_gib": r"Model loading took ([0-9.]+) GiB",
    "kv_available_gib": r"Available KV cache memory: (-?[0-9.]+) GiB",
    "kv_capacity_tokens": r"GPU KV cache size: ([\d,]+) tokens",
    "activation_peak_gib": r"torch peak memory increase: ([0-9.]+) ?GiB",
    "non_torch_gib": r"non-torch forward increase memory: ([0-9.]+) ?GiB",
    "cudagraph_gib": r"CUDA graph pool memory: ([0-9.]+) GiB \(actual\)",
    "encoder_budget_tokens": r"Encoder cache will be initialized with a budget of (\d+) tokens",
    "vllm_version": r"Initializing a V1 LLM engine \(v([^)]+)\)",
}
FAILURES = (r"ValueError: (To serve at least one request[^\n]*|No available memory for the cache blocks[^\n]*)",
            r"(CUDA out of memory[^\n]*)")
READY = "Application startup complete"


def parse_log(text: str) -> dict:
    """The figures of one start-up log (first occurrence: rank 0), and the failure if it did not start."""
    out: dict = {}
    for key, pattern in PATTERNS.items():
        m = re.search(pattern, text)
        if m:
            raw = m.group(1).replace(",", "")
            out[key] = raw if key == "vllm_version" else (int(raw) if key.endswith("tokens") else float(raw))
    for pattern in FAILURES:
        m = re.search(pattern, text)
        if m:
            out["failure"] = m.group(1)[:300]
            break
    return out


def serve_once(model_dir: Path, max_model_len: int, util: float, seqs: int | None, port: int, timeout: float,
               log_path: Path) -> str:
    """Start `vllm serve`, wait for ready / exit / timeout, stop it; the log text."""
    cmd = ["vllm", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(util)]
    if seqs:
        cmd += ["--max-num-seqs", str(seqs)]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "DEBUG", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        start = time.time()
        while proc.poll() is None and time.time() - start < timeout:
            time.sleep(2)
            if READY in log_path.read_text(errors="replace"):
                break
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    return log_path.read_text(errors="replace")


def predict(size: str, card_gib: float, version: str | None, max_model_len: int, util: float, seqs: int | None):
    from qvl.plan.gpus import Gpu
    from qvl.plan.memory import plan_serve

    return plan_serve(size, _gpu=Gpu("measured", card_gib, "measured card"), backend="vllm", max_model_len=max_model_len,
                      gpu_memory_utilization=util, max_num_seqs=seqs, vllm_version=version, recommend=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="8B")
    ap.add_argument("--settings", nargs="+", default=["32768:0.9", "32768:0.22", "262144:0.22"])
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per server start")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        from importlib.metadata import version

        installed = version("vllm")
    except Exception:  # noqa: BLE001 - no vLLM: nothing to measure
        print("vLLM is not installed here: pip install -e '.[vllm]' on a GPU machine, then run this again")
        return 2
    import torch

    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    model_dir = Path("/tmp") / f"qvl-random-{args.size}"
    if not (model_dir / "config.json").is_file():
        qvl = Path(sys.executable).with_name("qvl")
        subprocess.run([str(qvl) if qvl.exists() else "qvl", "model", "random", "--size", args.size,
                        "--out", str(model_dir)], check=True)
    cases = []
    for i, setting in enumerate(args.settings):
        fields = setting.split(":")
        max_len, util = int(fields[0]), float(fields[1])
        seqs = int(fields[2]) if len(fields) > 2 else None
        log_path = out / f"{args.size}-{max_len}-{util}{f'-{seqs}' if seqs else ''}.log"
        logged = parse_log(serve_once(model_dir, max_len, util, seqs, 8300 + i, args.timeout, log_path))
        plan = predict(args.size, card_gib, logged.get("vllm_version", installed), max_len, util, seqs)
        case = {"id": f"qwen3-vl-{args.size.lower()}-{max_len}-{util}", "model": f"Qwen3-VL-{args.size} (random weights)",
                "shape": f"qwen3-vl:{args.size}", "vision_language": True, "card": torch.cuda.get_device_name(0),
                "card_gib": round(card_gib, 2), "vllm_version": logged.get("vllm_version", installed), "engine": "v1",
                "settings": {"gpu_memory_utilization": util, "tensor_parallel_size": 1, "max_model_len": max_len,
                             **({"max_num_seqs": seqs} if seqs else {})},
                "logged": {k: v for k, v in logged.items() if k not in ("vllm_version", "failure")},
                "outcome": f"failed: {logged['failure']}" if "failure" in logged else
                           ("started" if "kv_available_gib" in logged else "unknown (see the log)"),
                "source": f"bench/vllm_startup.py on {torch.cuda.get_device_name(0)}", "status": "measured",
                "predicted": {"kv_available_gib": round(plan.kv_available_gib, 2),
                              "kv_margin_gib": round(plan.kv_margin_gib or 0, 2),
                              "profiling_peak_gib": round(plan.parts["vLLM profiling peak"], 2),
                              "fits": plan.fits, "accounting": plan.settings["vllm_accounting"]}}
        cases.append(case)
        kv = logged.get("kv_available_gib")
        print(f"{case['id']}: logged KV {kv} GiB, predicted {plan.kv_estimate}; logged {case['outcome']}, "
              f"planned {'fits' if plan.fits else 'does not fit'}", flush=True)
    tmp = out / "vllm_startup.json.tmp"
    tmp.write_text(json.dumps({"cases": cases}, indent=1))
    tmp.replace(out / "vllm_startup.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
