"""Probe: on a CPU, does preparing requests in worker processes (``--preprocess-workers``) give the engine's thread
its interpreter back?

On a GPU the engine's thread spends most of a decode step waiting for the GPU (the interpreter lock released) and a
little launching the next one (holding it). ``bench/experiments/prepare_contention.py`` cannot show that on a CPU:
there the engine's own compute takes the cores. Here the engine is a stand-in with a GPU's shape: each step holds
the interpreter for ``--host-ms`` of Python (launching), then waits ``--device-ms`` with it released (the GPU), and
gives every running request one token. Requests are prepared for real (the checkpoint's chat template, tokenizer and
image processor, positions, media keys: qvl.infer.prepare.Preparer), in the server's process (``--preprocess-workers
0``, ``--preprocess-threads`` at a time) or by worker processes. ``qvl serve``'s own app and server (run_server) in a
child process (its log: ``--json``'s name with ``.server.log``); the clients (``qvl.serve.loadgen``) in this one:
448x448 PNGs, 20 ms apart. The stand-in's "launching" spins for ``--host-ms`` of wall time.

What to read: the engine's mean step against its nominal ``host + device`` (how long its thread waited for the
interpreter), and TPOT / TTFT / tok/s. On a 2-core machine the workers also take cores from the server's process.

    python bench/experiments/prepare_pool_probe.py --model TINY_DIR --json $OUT/prepare_pool_probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from qvl.infer.engine import Engine  # noqa: E402
from qvl.infer.types import Chunk, Handle, SamplingParams  # noqa: E402


class StandInEngine(Engine):
    """Real preparing, a stand-in model: a step holds the interpreter ``host_s``, releases it ``device_s``."""

    backend = "stand-in"

    def __init__(self, preparer, host_s: float, device_s: float):
        self.preparer, self.host_s, self.device_s = preparer, host_s, device_s
        self.name, self.max_model_len, self.default_sampling = "stand-in", preparer.max_model_len, SamplingParams()
        self.steps, self.step_seconds = 0, 0.0
        self._new: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._run, name="qvl-generate", daemon=True).start()

    def prepare(self, request):
        return self.preparer(request)

    def submit(self, prepared, on_chunk=None):
        handle = Handle(prepared.prompt_tokens, on_chunk)
        with self._lock:
            self._new.append([handle, prepared.sampling.max_new_tokens, 0])
        return handle

    def _run(self) -> None:
        running: list = []
        while True:
            with self._lock:
                running += self._new
                self._new = []
            if not running:
                time.sleep(0.001)
                continue
            t = time.perf_counter()
            end = t + self.host_s
            while time.perf_counter() < end:  # launching: Python holding the interpreter
                pass
            time.sleep(self.device_s)  # the GPU's part: the lock released
            for row in running:
                row[2] += 1
                done = row[2] >= row[1] or row[0].cancelled
                row[0].emit(Chunk(text=" w", finish_reason="length" if done else None,
                                  prompt_tokens=row[0].prompt_tokens, completion_tokens=row[2]))
            running = [row for row in running if row[2] < row[1] and not row[0].cancelled]
            with self._lock:
                self.steps += 1
                self.step_seconds += time.perf_counter() - t

    def cache_stats(self) -> dict:  # /debug/stages' reuse: the stand-in's step count and time ride along
        with self._lock:
            return {"steps": self.steps, "step_seconds": self.step_seconds}


def serve(args) -> None:
    """The child: ``qvl serve``'s app on the stand-in engine, until killed."""
    import torch
    from transformers import AutoConfig

    from qvl.data.packing import RopeIndex
    from qvl.infer.prepare import Preparer
    from qvl.models.load import load_processor, model_class
    from qvl.serve.app import ServeSettings, run_server

    config = AutoConfig.from_pretrained(args.model)
    with torch.device("meta"):  # the model's class and config only, for the mRoPE positions (no weights)
        model = model_class(config.model_type)(config)
    preparer = Preparer(load_processor(args.model), 4096, rope_index=RopeIndex(model), media_keys=True,
                        image_cache_bytes=256 * 2**20)
    engine = StandInEngine(preparer, args.host_ms / 1e3, args.device_ms / 1e3)
    run_server(engine, ServeSettings(port=args.port, preprocess_workers=args.workers, log_level="warning"))


def png_url(seed: int, side: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def measure(args, workers: int, seed: int) -> dict:
    import httpx

    from qvl.serve.loadgen import run_staggered, summarize
    from qvl.serve.process import free_port

    port = free_port()
    child = [sys.executable, __file__, "--serve", "--model", args.model, "--port", str(port), "--workers", str(workers),
             "--host-ms", str(args.host_ms), "--device-ms", str(args.device_ms)]
    import subprocess

    log = open(args.log, "a") if args.log else subprocess.DEVNULL
    proc = subprocess.Popen(child, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the probe's server did not start (its log: {args.log})")
            time.sleep(0.2)

        def bodies(n: int, start: int) -> list[dict]:
            return [{"model": "stand-in", "max_tokens": args.tokens, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_url(seed + start + i, args.image)}},
                {"type": "text", "text": "Describe this image."}]}]} for i in range(n)]

        url = base + "/v1/chat/completions"
        asyncio.run(run_staggered(url, bodies(4, 10_000), args.stagger))  # warm: first requests, first shapes
        before = httpx.get(base + "/debug/stages", params={"reset": "true"}, timeout=30).json()["reuse"]
        results = asyncio.run(run_staggered(url, bodies(args.clients, 0), args.stagger))
        after = httpx.get(base + "/debug/stages", timeout=30).json()
        steps = after["reuse"]["steps"] - before["steps"]
        step_ms = (after["reuse"]["step_seconds"] - before["step_seconds"]) * 1e3 / max(steps, 1)
        s = summarize(results)
        return {"workers": workers, "errors": s["errors"], "output_tok_s": s["output_tok_s"],
                "ttft_p50_ms": s["ttft_p50_s"] * 1e3, "tpot_p50_ms": s["tpot_p50_s"] * 1e3,
                "itl_p99_ms": s["itl_p99_s"] * 1e3, "engine_step_ms": step_ms, "engine_steps": steps,
                "slot_to_prepared_p50_ms": after["stages"].get("slot->prepared", {}).get("p50_ms"),
                "media_to_slot_p50_ms": after["stages"].get("media->slot", {}).get("p50_ms")}
    finally:
        proc.terminate()
        proc.wait(30)
        if args.log:
            log.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a checkpoint folder (its processor is used; no weights loaded)")
    ap.add_argument("--workers", default="0,1,2", help="--preprocess-workers values to compare")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--stagger", type=float, default=0.02)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--image", type=int, default=448)
    ap.add_argument("--host-ms", type=float, default=1.0, help="a step's launching, holding the interpreter")
    ap.add_argument("--device-ms", type=float, default=6.0, help="a step's GPU time, the interpreter released")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        args.workers = int(args.workers)
        serve(args)
        return 0
    args.log = str(Path(args.json).with_suffix(".server.log")) if args.json else None
    out = {"probe": "bench/experiments/prepare_pool_probe.py", "command": "python " + " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), "workload": vars(args), "rows": []}
    for r in range(args.repeats):
        for workers in (int(w) for w in args.workers.split(",")):
            row = measure(args, workers, seed=r * 1000)
            out["rows"].append(row)
            print(f"workers {workers}: {row['output_tok_s']:7.0f} tok/s  TTFT p50 {row['ttft_p50_ms']:6.1f} ms  "
                  f"TPOT p50 {row['tpot_p50_ms']:5.2f} ms  engine step {row['engine_step_ms']:5.2f} ms (nominal "
                  f"{args.host_ms + args.device_ms:.2f})  prepare p50 {row['slot_to_prepared_p50_ms']:.1f} ms, "
                  f"wait {row['media_to_slot_p50_ms']:.1f} ms  errors {row['errors']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
