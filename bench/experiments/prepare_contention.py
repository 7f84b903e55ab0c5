"""Probe: how much of `qvl serve`'s loss to its engine comes from preprocessing requests in the server's process?

The same engine, the same staggered requests (one PNG + a question each, forced new tokens), no HTTP:

- ``before``: every request prepared before the run, as ``bench/serve.py``'s engine rows do (the engine's ceiling);
- ``threads``: each prepared when it arrives, ``--threads`` at a time on a thread pool, then submitted, as the
  server does with ``--preprocess-workers 0`` (decode, chat template, tokenizer, image processor, positions, media
  keys);
- ``workers``: each prepared when it arrives by ``--workers`` worker processes (qvl.infer.prepare_pool, ``qvl serve
  --preprocess-workers N``), the threads waiting for them.

Run the modes ``--repeats`` times, alternating; the first, untimed pass meets every shape. Before them, what one
request's preparing costs the server's process, one at a time, engine idle (``prepare_cost``): wall and this
process's CPU milliseconds (all its threads; the workers' own CPU not counted), in the process and by a worker. The
CPU this process spends is what the engine's thread and the event loop cannot have while it runs under the
interpreter lock; on a CPU-only machine the modes' rows mostly measure cores taken from the engine's own compute.

    python bench/experiments/prepare_contention.py --model /tmp/qwen3vl-8b-random --json $OUT/prepare_contention.json
    python bench/experiments/prepare_contention.py --model TINY_DIR --device cpu   # a smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from qvl.data.samples import Media, Message  # noqa: E402
from qvl.infer.types import Request  # noqa: E402
from qvl.serve.loadgen import EngineClients, summarize  # noqa: E402

QUESTION = "Describe this image in detail."


def png(seed: int, side: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def run(engine, images: list[bytes], mode: str, threads: int, stagger: float, tokens: int, workers=None) -> dict:
    sampling = engine.sampling(max_new_tokens=tokens, ignore_eos=True)

    def request(data: bytes) -> Request:
        return Request([Message("user", [Media("image", Image.open(io.BytesIO(data)).convert("RGB")), QUESTION])],
                       sampling)

    clients = EngineClients(len(images))
    prepared = [engine.prepare(request(b)) for b in images] if mode == "before" else None
    prepare = workers if mode == "workers" else engine.prepare
    pool = ThreadPoolExecutor(max(threads, workers.workers) if mode == "workers" else threads)
    t0 = time.perf_counter()
    for i, data in enumerate(images):
        time.sleep(max(0.0, t0 + i * stagger - time.perf_counter()))
        clients.start(i)
        if prepared is not None:
            engine.submit(prepared[i], clients.on_chunk(i))
        else:
            pool.submit(lambda data=data, i=i: engine.submit(prepare(request(data)), clients.on_chunk(i)))
    results = clients.wait()
    pool.shutdown()
    s = summarize(results)
    return {k: s[k] for k in ("completed", "output_tok_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s")}


def prepare_cost(engine, prepare, images: list[bytes]) -> dict:
    """Mean wall and this process's CPU ms of preparing each image's request, one after another."""
    sampling = engine.sampling(max_new_tokens=8)
    requests = [Request([Message("user", [Media("image", Image.open(io.BytesIO(b)).convert("RGB")), QUESTION])],
                        sampling) for b in images]
    prepare(requests[0])
    wall, cpu = time.perf_counter(), time.process_time()
    for r in requests:
        prepare(r)
    n = len(requests)
    return {"wall_ms": (time.perf_counter() - wall) * 1e3 / n, "server_cpu_ms": (time.process_time() - cpu) * 1e3 / n}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (`qvl model random --size 8B --out DIR`)")
    ap.add_argument("--device", default=None, help="cpu, or the default (CUDA when present)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--stagger", type=float, default=0.02, help="seconds between arrivals")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--image", type=int, default=448, help="side of each square PNG")
    ap.add_argument("--threads", type=int, default=2, help="requests prepared at once (qvl serve's default)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the workers mode")
    ap.add_argument("--modes", default="before,threads,workers")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-gib", type=float, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    from qvl.infer.prepare_pool import PreparePool
    from qvl.infer.transformers_backend import TransformersEngine

    engine = TransformersEngine.load(args.model, device=args.device, max_batch_size=max(args.clients, 8),
                                     max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib,
                                     say=lambda *a: None)
    images = [png(i, args.image) for i in range(args.clients)]
    out = {"probe": "bench/experiments/prepare_contention.py", "command": "python " + " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name() if torch.cuda.is_available()
           and args.device != "cpu" else "cpu", "torch": torch.__version__, "engine": engine.describe(),
           "workload": vars(args), "rows": {}}
    modes = args.modes.split(",")
    workers = PreparePool(engine.preparer, args.workers) if "workers" in modes else None
    try:
        out["prepare_cost"] = {"in_process": prepare_cost(engine, engine.prepare, images)}
        if workers is not None:
            out["prepare_cost"]["worker"] = prepare_cost(engine, workers, images)
        for name, cost in out["prepare_cost"].items():
            print(f"prepare {name:10s} {cost['wall_ms']:6.1f} ms wall, {cost['server_cpu_ms']:6.1f} ms of this "
                  "process's CPU a request", flush=True)
        for mode in modes:  # meets every shape
            run(engine, images, mode, args.threads, args.stagger, args.tokens, workers)
        for _ in range(args.repeats):
            for mode in modes:
                row = run(engine, images, mode, args.threads, args.stagger, args.tokens, workers)
                out["rows"].setdefault(mode, [])
                out["rows"][mode].append(row)
                print(f"{mode:8s} {row['output_tok_s']:8.0f} tok/s  TTFT p50 {row['ttft_p50_s'] * 1e3:6.0f} ms  "
                      f"TPOT p50 {row['tpot_p50_s'] * 1e3:5.1f} ms", flush=True)
    finally:
        engine.close()
        if workers is not None:
            workers.close()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
