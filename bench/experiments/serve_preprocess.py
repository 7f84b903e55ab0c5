"""How many requests `qvl serve` should preprocess at once: a burst of requests prepared by the thread pool, all at once
or a few at a time (``--preprocess-threads``), next to a thread that works like the engine's (holds the interpreter
for ``host_ms`` of Python a step, then waits ``device_ms`` for the device without it).

Each request is what the server does off its event loop for one chat message: the data URL of a PNG decoded
(``MediaResolver``), then ``TransformersEngine.prepare`` (chat template, tokenizer, image processor, positions, the
vision cache's content hash). Printed per limit: the requests' time from arrival to prepared (p50 / p99 / the last),
and the engine-like thread's step time meanwhile (p50 / p99), against its time alone.

    python bench/experiments/serve_preprocess.py                       # the tiny model's processor, 448x448 PNGs
    python bench/experiments/serve_preprocess.py --requests 64 --limits 40,4,2,1 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def engine_like(stop: threading.Event, host_s: float, device_s: float, steps: list[float]) -> None:
    """Steps of ``host_s`` Python (holding the GIL) and ``device_s`` of waiting (not holding it)."""
    while not stop.is_set():
        t = time.perf_counter()
        x = 0
        while time.perf_counter() - t < host_s:
            x += 1
        time.sleep(device_s)
        steps.append(time.perf_counter() - t)


def burst(engine, resolver, refs, limit: int, stagger_s: float) -> list[float]:
    """Seconds from each request's arrival to its prepared inputs, ``limit`` preparing at once (40 pool threads)."""
    from qvl.data.samples import Media, Message
    from qvl.infer.types import Request

    gate = threading.BoundedSemaphore(limit)
    sampling = engine.sampling(max_new_tokens=16)

    def one(ref, arrived):
        image = resolver.image(ref)
        with gate:
            engine.prepare(Request([Message("user", [Media("image", image), "Describe this image in detail."])],
                                   sampling))
        return time.perf_counter() - arrived

    with ThreadPoolExecutor(40) as pool:
        futures = []
        for ref in refs:
            futures.append(pool.submit(one, ref, time.perf_counter()))
            time.sleep(stagger_s)
        return [f.result() for f in futures]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: the tiny model, built)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--stagger", type=float, default=0.0, help="seconds between arrivals (0: one burst)")
    ap.add_argument("--image", default="448x448")
    ap.add_argument("--limits", default="40,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--host-ms", type=float, default=2.0)
    ap.add_argument("--device-ms", type=float, default=8.0)
    args = ap.parse_args(argv)

    from serve import data_url, png  # bench/serve.py

    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.models.load import load
    from qvl.serve.loadgen import percentile as pct
    from qvl.serve.media import MediaResolver
    from qvl.serve.schema import MediaRef

    if not args.model:
        from qvl.models.build import build_tiny

        args.model = str(build_tiny(Path(tempfile.mkdtemp(prefix="qvl-exp-")) / "tiny").path)
    model, processor = load(args.model)
    engine = TransformersEngine(model, processor, name="m")
    w, h = (int(x) for x in args.image.split("x"))
    refs = [MediaRef("image", data_url(png(w, h, i)), "messages[0].content[0]") for i in range(args.requests)]
    resolver = MediaResolver(cache_items=0)
    alone: list[float] = []
    stop = threading.Event()
    t = threading.Thread(target=engine_like, args=(stop, args.host_ms / 1e3, args.device_ms / 1e3, alone))
    t.start()
    time.sleep(1.0)
    stop.set()
    t.join()
    print(f"engine-like step alone: p50 {pct(alone, 0.5) * 1e3:.1f} ms; {args.requests} requests of {args.image}, "
          f"{args.stagger * 1e3:.0f} ms apart", flush=True)
    limits = [int(x) for x in args.limits.split(",")]
    rows = {k: {"latency": [], "last": [], "steps": []} for k in limits}
    for _ in range(args.repeats):
        for k in limits:  # interleaved: a shared machine's load drifts
            steps: list[float] = []
            stop = threading.Event()
            t = threading.Thread(target=engine_like, args=(stop, args.host_ms / 1e3, args.device_ms / 1e3, steps))
            t.start()
            lat = burst(engine, resolver, refs, k, args.stagger)
            stop.set()
            t.join()
            rows[k]["latency"] += lat
            rows[k]["last"].append(max(lat))
            rows[k]["steps"] += steps
    for k, r in rows.items():
        print(f"at most {k:>2} at once: arrival -> prepared p50 {pct(r['latency'], 0.5) * 1e3:.0f} ms, p99 "
              f"{pct(r['latency'], 0.99) * 1e3:.0f} ms, last {statistics.median(r['last']) * 1e3:.0f} ms; engine-like "
              f"step p50 {pct(r['steps'], 0.5) * 1e3:.1f} ms, p99 {pct(r['steps'], 0.99) * 1e3:.1f} ms", flush=True)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
