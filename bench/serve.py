"""`qvl serve` under load, measured the way `vllm bench serve` measures a server, against the engine alone.

One call:

1. **HTTP**: starts `qvl serve --model DIR` through the real CLI in its own process, waits for
   /health, and drives it from this process with async streaming clients (httpx): every request is
   one PNG (its own random pixels, so no request reuses another's image) + a short question, a fixed
   number of new tokens (``ignore_eos``: random weights never stop on their own).
   * concurrency sweep: N clients (1, 8, 32, 64, 128), one request each, started 20 ms apart;
   * Poisson mode: requests arriving at R per second;
   * turns: a two-turn conversation about one 1024x1024 image (turn 2 re-sends the image, a fixed turn-1
     answer -- ``TURN1_ANSWER``, so its length does not depend on the weights -- and a new question):
     TTFT of turn 2 vs turn 1, at concurrency 1; once with a noise PNG (``turns``: 3.1 MB, 4.2 as base64,
     whose JSON encoding in the client took 48 ms on an H100's host) and once with a photo-like JPEG
     (``turns_jpeg``: 0.24 MB).
   Reported per row: output tok/s, TTFT / TPOT / inter-token latency (mean, p50, p99), errors.
   Peak GPU memory of the card is sampled (nvidia-smi) while the server runs.
2. **Engine**: the same model loaded in this process (same slots, context and cache), the same
   requests prepared beforehand and submitted with the same arrival times: the engine's ceiling,
   and ``http_vs_engine`` = HTTP output tok/s / engine output tok/s per row.

Both phases first run a warm-up (1 request, then the largest level) so CUDA graph captures and
compilation are not timed. Results go to ``--json`` (card, versions, date, command).

    qvl model random --size 8B --out /tmp/qwen3vl-8b-random
    python bench/serve.py --model /tmp/qwen3vl-8b-random --json bench/results/serve.json
    python bench/serve.py --smoke --json /tmp/serve_smoke.json     # CPU, the tiny model (a test runs this)

The mixture-of-experts model the same way (`qvl model random --size 30B-A3B`, 58 GiB); ``peak_vs_plan`` is the
card's peak over `qvl plan serve`'s total for the same slots and context (docs/benchmarks.md has the command).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from qvl.serve.loadgen import EngineClients, RequestResult, run_poisson, run_staggered, summarize  # noqa: E402
from qvl.serve.process import ServerProcess  # noqa: E402

from provenance import source_tree  # noqa: E402

QUESTION = "Describe this image in detail."
FOLLOW_UP = "What colours stand out, and where are they?"
# Turn 2 sends this as the assistant's turn-1 answer, as a chat client sends the model's answer back. Fixed, not
# the model's own: a random-weight model's answer re-tokenises to any length (3,549 prompt tokens once, over the
# 2,048-token context), so the turn-2 prompt would depend on the weights. Turn 2 of a 1024x1024 image: 1,330
# prompt tokens with the built checkpoints' tokenizer (turn 1: 1,047; tests/serve/test_bench_serve.py).
TURN1_ANSWER = ("The image is a square of fine coloured noise: every pixel takes its own random red, green and blue "
                "value, so no shapes, edges or objects can be seen. Viewed from a distance the square looks an even "
                "mid grey with a faint grain; up close it is a dense speckle of saturated dots in every hue. There "
                "is no text, no border and no lighting gradient, and the noise looks the same in every corner and "
                "in the centre, as if a television were tuned to an empty channel.")


def png(w: int, h: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def photo_jpeg(w: int, h: int, seed: int) -> bytes:
    """A photo-like JPEG (quality 90, as a phone or a browser's canvas saves one): smooth regions from a coarse random
    grid scaled up, with a sensor-like grain on top. At 1024x1024 it is 0.24 MB, where the noise PNG is 3.1 MB, so the
    client's part of a request (encoding the body, sending it) and the server's decoding are what a real photo costs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    grain = rng.normal(0, 6, (h, w, 3))
    pixels = np.clip(np.asarray(coarse, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


IMAGE_KINDS = {"png": png, "jpeg": photo_jpeg}  # noise PNG (the sweep's; the worst case for size), photo-like JPEG


def data_url(data: bytes) -> str:
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class Workload:
    """The requests of one run; seeds make every request's image distinct and the same in both phases."""

    def __init__(self, size: tuple[int, int], tokens: int, model: str, kind: str = "png"):
        self.size, self.tokens, self.model, self.kind = size, tokens, model, kind
        self._seed = 0

    def images(self, n: int) -> list[bytes]:
        make = IMAGE_KINDS[self.kind]
        out = [make(*self.size, self._seed + i) for i in range(n)]
        self._seed += n
        return out

    def body(self, image: bytes, messages_before: list | None = None, question: str = QUESTION) -> dict:
        user = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                            {"type": "text", "text": question}]}
        return {"model": self.model, "messages": (messages_before or []) + [user], "max_tokens": self.tokens,
                "ignore_eos": True}


# ---------------------------------------------------------------------------------------------- GPU memory
class GpuMemory:
    """Peak memory in use on the card while the server runs (nvidia-smi, sampled every 0.5 s)."""

    def __init__(self):
        self.peak_mib = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=10).stdout
                used = float(out.strip().splitlines()[0])
                self.peak_mib = max(self.peak_mib or 0.0, used)
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return  # no nvidia-smi (CPU): nothing to sample
            self._stop.wait(0.5)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=15)


def planned_memory(args) -> dict:
    """`qvl plan serve MODEL --backend transformers` for the server's slots and context (the fast decode path:
    its slot cache, a few prompts prefilled at a time, the vision cache) on this card, to set the peak against."""
    import torch

    from qvl.plan.memory import plan_serve
    from qvl.plan.model import resolve_model

    shape = resolve_model(args.model)
    p = plan_serve(shape.name, _shape=shape, gpu_mem=torch.cuda.get_device_properties(0).total_memory / 2**30,
                   backend="transformers", max_model_len=args.max_model_len, max_num_seqs=args.max_batch_size,
                   fast_decode=True, recommend=False)
    return {"plan_total_gib": p.total_gib, "plan_peak_allocated_gib": p.peak_allocated_gib, "plan_parts_gib": p.parts}


# ---------------------------------------------------------------------------------------------- HTTP phase
def http_phase(args, work: Workload, plan: dict, out: dict, save) -> None:
    server_args = ["--model", args.model, "--max-batch-size", str(args.max_batch_size),
                   "--max-model-len", str(args.max_model_len)]
    if args.kv_cache_gib:
        server_args += ["--kv-cache-gib", str(args.kv_cache_gib)]
    if args.cpu:
        server_args += ["--cpu-only"]
    server_args += shlex.split(args.server_args)
    server = ServerProcess(server_args, log_path=Path(args.log_dir) / "server.log")
    out["server_command"] = " ".join(["qvl", *server.command[3:]])
    t = time.perf_counter()
    with GpuMemory() as memory, server:
        out["server_startup_s"] = time.perf_counter() - t
        url = server.url + "/v1/chat/completions"
        print(f"qvl serve ready in {out['server_startup_s']:.0f} s ({server.url})", flush=True)
        rows = out.setdefault("http", {})
        t = time.perf_counter()
        for n in plan["warmup"]:
            asyncio.run(run_staggered(url, [work.body(i) for i in plan["images"][f"warmup{n}"]], args.stagger))
        out["http_warmup_s"] = time.perf_counter() - t
        stages = out.setdefault("server_stages", {})
        server_stages(server.url)  # the warm-up's requests leave the window
        for n in plan["clients"]:
            results = asyncio.run(run_staggered(url, [work.body(i) for i in plan["images"][f"c{n}"]],
                                                args.stagger))
            rows[f"clients_{n}"] = summarize(results)
            stages[f"clients_{n}"] = server_stages(server.url)
            print(f"http {n} clients: {_line(rows[f'clients_{n}'])}", flush=True)
            print(f"  server, to the first token: {_stages_line(stages[f'clients_{n}'])}", flush=True)
            save()
        if args.profile_clients:  # an extra run, so that the sampling's cost stays out of the rows above
            out["thread_profile"] = thread_profile(server.url, url, work, args.profile_clients, args.stagger)
        for rate in plan["rates"]:
            results = asyncio.run(run_poisson(url, [work.body(i) for i in plan["images"][f"r{rate}"]], rate))
            rows[f"rate_{rate:g}"] = summarize(results)
            stages[f"rate_{rate:g}"] = server_stages(server.url)
            print(f"http {rate:g} req/s: {_line(rows[f'rate_{rate:g}'])}", flush=True)
            print(f"  server, to the first token: {_stages_line(stages[f'rate_{rate:g}'])}", flush=True)
            save()
        for name, turn_work, images in plan["turns"]:
            out[name] = turns(url, turn_work, images, server.url)
            print(f"{name}: { {k: v for k, v in out[name].items() if k != 'server'} }", flush=True)
            for turn, runs in out[name].get("server", {}).items():
                if runs:  # the last conversation's: the first may still meet new shapes
                    print(f"  {turn}, server: {runs[-1]['stages_ms']} ms; outside it {runs[-1]['outside_server_ms']} ms; "
                          f"reused {runs[-1]['reused']}", flush=True)
            save()
        out["server_alive_after"] = server.alive()
        out["server_rss_gib"] = server.rss_bytes() / 2**30
    out["peak_gpu_memory_gib"] = memory.peak_mib / 1024 if memory.peak_mib else None
    if out["peak_gpu_memory_gib"]:
        out.update(planned_memory(args))
        out["peak_vs_plan"] = out["peak_gpu_memory_gib"] / out["plan_total_gib"]
    save()


def turn_bodies(work: Workload, image: bytes) -> tuple[dict, dict]:
    """The two requests of one conversation: turn 1 (the image, a question), turn 2 (the same image again, the
    fixed turn-1 answer, a follow-up question) -- what a chat client sends, with a known answer length."""
    first = work.body(image)
    history = first["messages"] + [{"role": "assistant", "content": TURN1_ANSWER}]
    return first, {**first, "messages": history + [{"role": "user", "content": FOLLOW_UP}]}


def turns(url: str, work: Workload, images: list[bytes], base_url: str | None = None) -> dict:
    """TTFT of turn 1 (a new image) and turn 2 (the image, the answer, a follow-up), one conversation at a time.
    ``base_url`` (the server's): each turn's own split of its time to first token (ms), and what the server reused
    for it (prompt tokens not prefilled again, images not encoded again), from its /debug/stages."""
    import statistics

    ttft, tokens, splits = {"turn1": [], "turn2": []}, {}, {"turn1": [], "turn2": []}
    reuse = (server_stages(base_url).get("reuse") or {}) if base_url else {}  # the window starts here
    for image in images:
        body1, body2 = turn_bodies(work, image)
        for turn, body in (("turn1", body1), ("turn2", body2)):
            r = asyncio.run(run_staggered(url, [body], 0.0))[0]
            if not r.ok:
                return {"error": r.error}
            ttft[turn].append(r.ttft)
            tokens[turn] = r.prompt_tokens
            if base_url:
                s = server_stages(base_url)
                now = s.get("reuse") or {}
                splits[turn].append({"stages_ms": {k: round(v["p50_ms"], 1) for k, v in s.get("stages", {}).items()},
                                     "reused": {k: now[k] - reuse.get(k, 0) for k in now},
                                     "outside_server_ms": outside_server(r, s.get("last") or {})})
                reuse = now
    t1, t2 = statistics.median(ttft["turn1"]), statistics.median(ttft["turn2"])
    out = {"image": f"{work.size[0]}x{work.size[1]}", "conversations": len(images),
           "prompt_tokens": [tokens["turn1"], tokens["turn2"]], "turn1_answer_chars": len(TURN1_ANSWER),
           "turn1_ttft_s": t1, "turn2_ttft_s": t2, "turn2_vs_turn1": t2 / t1, "turn1_ttft_all_s": ttft["turn1"],
           "turn2_ttft_all_s": ttft["turn2"],
           # the first follow-up after start-up apart: the server's first use of some of its kernels, once
           "first_turn2_ttft_s": ttft["turn2"][0]}
    if base_url:
        out["server"] = splits
        totals = {turn: [run["stages_ms"].get("total") for run in runs] for turn, runs in splits.items()}
        if all(totals[turn] and None not in totals[turn] for turn in totals):
            # the same ratio from the server's own arrived->sent times: without the client's part (encoding and
            # sending the body, the same for both turns), what reusing the image and the prompt saves
            out["turn2_vs_turn1_server"] = statistics.median(totals["turn2"]) / statistics.median(totals["turn1"])
    return out


def outside_server(r, last: dict) -> dict:
    """The client's part of a request's time to first token, from the server's absolute marks (perf_counter is one
    clock for the machine's processes): ``client->arrived`` (encoding the body, connecting, sending it, the server's
    HTTP parsing up to the route; ``of which client encoding``: the body's JSON) and ``loop->client`` (the first
    content event, from its hand-off to the server's HTTP writer to the client's parse). Not from ``sent`` (the
    write returned): the client can parse the event before the server's coroutine resumes, -0.3 ms on a 2-core CPU."""
    if "arrived" not in last or "loop" not in last or not r.token_times:
        return {}
    return {"client->arrived": round((last["arrived"] - r.start) * 1e3, 1),
            "of which client encoding": round((r.encoded - r.start) * 1e3, 3) if r.encoded else None,
            "loop->client": round((r.token_times[0] - last["loop"]) * 1e3, 1)}


def thread_profile(base_url: str, url: str, work: Workload, n: int, stagger: float) -> dict:
    """``n`` staggered clients again with the server sampling its threads (qvl.serve.threads): which thread spent
    the CPU time, and where, while the HTTP path fell behind the engine."""
    import httpx

    try:
        httpx.post(base_url + "/debug/threads", timeout=30).raise_for_status()
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    results = asyncio.run(run_staggered(url, [work.body(i) for i in work.images(n)], stagger))  # new images
    got = httpx.get(base_url + "/debug/threads", timeout=30).json()
    server_stages(base_url)  # these requests leave the stage window of the next row
    busy = [t for t in got.get("threads", []) if (t.get("cpu_s") or 0) > 0.01][:12]
    print(f"threads at {n} clients ({_line(summarize(results))}), CPU s in {got.get('seconds', 0):.1f} s:", flush=True)
    for t in busy:
        print(f"  {t['name'][:32]:32} {t['cpu_s']:6.2f} s  {t['in'][:2]}  {t['in_qvl'][:2]}", flush=True)
    return {"clients": n, "http": summarize(results), "seconds": got.get("seconds"), "samples": got.get("samples"),
            "threads": busy}


def staggered_ceiling(one: dict | None, clients: list[int], stagger: float, tokens: int) -> dict:
    """The most output tok/s that ``n`` clients ``stagger`` s apart could show if no step were slower than one
    client's: the last request arrives ``(n - 1) * stagger`` after the first, then needs its time to the first
    token and ``tokens - 1`` steps, so the run lasts at least that long. ``one``: a 1-client row (its TTFT and
    TPOT p50). A row's ``of_ceiling`` below 1 is what serving many at once costs (longer steps with more rows,
    prefills between them); a target above the ceiling asks for steps of many rows faster than one row's. From the
    engine's row (requests prepared beforehand) the HTTP rows' ratio also counts preparing each request."""
    if not one or not one.get("tpot_p50_s") or one.get("ttft_p50_s") is None:
        return {}
    return {f"clients_{n}": n * tokens / ((n - 1) * stagger + one["ttft_p50_s"] + (tokens - 1) * one["tpot_p50_s"])
            for n in clients if n >= 1}


def server_stages(base_url: str) -> dict:
    """The server's own split of the time to first token for the requests since the last call (its
    /debug/stages, which starts a new window): where HTTP TTFT goes beyond the engine's."""
    import httpx

    try:
        return httpx.get(base_url + "/debug/stages", params={"reset": "true"}, timeout=30).json()
    except (httpx.HTTPError, ValueError) as e:
        return {"error": f"{type(e).__name__}: {e}"}


def _stages_line(s: dict) -> str:
    return ", ".join(f"{k} {v['p50_ms']:.0f}/{v['p99_ms']:.0f}" for k, v in s.get("stages", {}).items()) + \
        " ms (p50/p99)"


def _line(s: dict) -> str:
    f = lambda v: "-" if v is None else f"{v * 1e3:.0f} ms"  # noqa: E731
    return (f"{s['output_tok_s']:.0f} tok/s, TTFT p50 {f(s['ttft_p50_s'])} p99 {f(s['ttft_p99_s'])}, "
            f"TPOT p50 {f(s['tpot_p50_s'])}, ITL p50 {f(s['itl_p50_s'])} p99 {f(s['itl_p99_s'])}, "
            f"errors {s['errors']}/{s['requests']}")


# ---------------------------------------------------------------------------------------------- engine phase
def engine_phase(args, work: Workload, plan: dict, out: dict, save) -> None:
    """The same requests straight into an in-process engine (prepared beforehand: the engine's ceiling)."""
    import torch

    from qvl.infer.transformers_backend import TransformersEngine

    t = time.perf_counter()
    engine = TransformersEngine.load(args.model, device="cpu" if args.cpu else None,
                                     max_batch_size=args.max_batch_size, max_model_len=args.max_model_len,
                                     kv_cache_gib=args.kv_cache_gib, say=print)
    out["engine_load_s"] = time.perf_counter() - t
    out["engine"] = {"describe": engine.describe()}
    rows = out["engine"]
    try:
        for n in plan["warmup"]:
            _engine_run(engine, work, plan["images"][f"warmup{n}"], [i * args.stagger for i in range(n)])
        for n in plan["clients"]:
            results = _engine_run(engine, work, plan["images"][f"c{n}"], [i * args.stagger for i in range(n)])
            rows[f"clients_{n}"] = summarize(results)
            print(f"engine {n} clients: {_line(rows[f'clients_{n}'])}", flush=True)
            save()
        import random

        for rate in plan["rates"]:
            rng, t, offsets = random.Random(0), 0.0, []  # the loadgen's arrival times (same seed)
            for _ in plan["images"][f"r{rate}"]:
                offsets.append(t)
                t += rng.expovariate(rate)
            rows[f"rate_{rate:g}"] = summarize(_engine_run(engine, work, plan["images"][f"r{rate}"], offsets))
            print(f"engine {rate:g} req/s: {_line(rows[f'rate_{rate:g}'])}", flush=True)
            save()
    finally:
        engine.close()
        engine._worker.join(timeout=60)
    if torch.cuda.is_available():
        out["engine_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del engine
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def _engine_run(engine, work: Workload, images: list[bytes], offsets: list[float]) -> list[RequestResult]:
    from PIL import Image

    from qvl.data.samples import Media, Message
    from qvl.infer.types import Request

    sampling = engine.sampling(max_new_tokens=work.tokens, ignore_eos=True)
    prepared = [engine.prepare(Request([Message("user", [Media("image", Image.open(io.BytesIO(b)).convert("RGB")),
                                                          QUESTION])], sampling)) for b in images]
    clients = EngineClients(len(images))
    t0 = time.perf_counter()
    for i, (p, offset) in enumerate(zip(prepared, offsets)):
        time.sleep(max(0.0, t0 + offset - time.perf_counter()))
        clients.start(i)
        engine.submit(p, clients.on_chunk(i))
    return clients.wait()


# ---------------------------------------------------------------------------------------------- main
def versions() -> dict:
    import torch
    import transformers

    v = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("fastapi", "uvicorn", "httpx", "uvloop", "httptools"):  # the last two: uvicorn's fast stack
        try:
            v[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            v[name] = None
    try:
        # "-dirty": the tree had changes on top of that commit (a GPU run takes the working tree as it is)
        v["qvl_commit"] = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT,
                                         capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        v["qvl_commit"] = None
    v["qvl_src_tree"] = source_tree()  # names the code that ran where the copy's .git is older than its files
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (e.g. `qvl model random --size 8B --out DIR`)")
    ap.add_argument("--clients", default="1,8,32,64,128", help="concurrency levels (one request per client)")
    ap.add_argument("--stagger", type=float, default=0.02, help="seconds between the clients' requests")
    ap.add_argument("--rates", default="8,24", help="Poisson request rates (req/s); '' for none")
    ap.add_argument("--rate-requests", type=int, default=96, help="requests per Poisson run")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request (ignore_eos)")
    ap.add_argument("--image", default="448x448", help="WxH of each request's PNG")
    ap.add_argument("--turn-image", default="1024x1024", help="WxH of the two-turn conversation's image")
    ap.add_argument("--turn-images", default="png,jpeg",
                    help="the conversations' image kinds: png (random noise, 3.1 MB at 1024x1024: the client's part of "
                         "a turn is mostly encoding its body), jpeg (photo-like, 0.24 MB, as a phone sends one)")
    # 8, not 3: the first follow-up after start-up took 1.17 s (H200, 2026-12-05) and, of three, moved the median
    ap.add_argument("--conversations", type=int, default=8, help="two-turn conversations (0: none)")
    ap.add_argument("--max-batch-size", type=int, default=64, help="KV-cache slots (server and engine)")
    ap.add_argument("--max-model-len", type=int, default=2048,
                    help="context (turn 2 of a 1024x1024-image conversation: 1,330 tokens)")
    ap.add_argument("--kv-cache-gib", type=float, default=24.0, help="64 slots x 2,048 tokens of the 8B: 18 GiB")
    ap.add_argument("--server-args", default="", help="more `qvl serve` flags, e.g. '--preprocess-threads 40'")
    ap.add_argument("--skip", default="", help="comma list: http, engine")
    ap.add_argument("--profile-clients", type=int, default=32,
                    help="after the sweep, this many clients again with the server sampling its threads (0: none)")
    ap.add_argument("--cpu", action="store_true", help="run the server and the engine on the CPU")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU, the tiny model (built if --model is not given), small levels: checks the bench runs")
    ap.add_argument("--log-dir", default=None, help="where the server's log goes (default: next to --json)")
    ap.add_argument("--json", default="bench/results/serve.json")
    args = ap.parse_args(argv)
    own = {"--model", "--max-batch-size", "--max-model-len", "--kv-cache-gib", "--cpu-only"}
    clash = sorted(own & {a.split("=")[0] for a in shlex.split(args.server_args)})
    if clash:  # the benchmark plans and reports with its own values of these: set them through its flags
        ap.error(f"--server-args may not set {', '.join(clash)}: use this benchmark's own flag (the memory plan and "
                 "the report follow it)")
    if args.smoke:
        args.cpu = True
        args.clients, args.rates, args.rate_requests, args.tokens = "1,4", "20", 6, 6
        args.image, args.turn_image, args.conversations = "64x64", "96x96", 1
        args.max_batch_size, args.max_model_len, args.kv_cache_gib = 4, 1024, 0.25
        args.profile_clients = min(args.profile_clients, 4)
        if not args.model:
            from qvl.models.build import build_tiny

            args.model = str(build_tiny(Path(tempfile.mkdtemp(prefix="qvl-bench-")) / "tiny").path)
    if not args.model:
        ap.error("--model is required (except with --smoke)")
    unknown = set(filter(None, args.turn_images.split(","))) - set(IMAGE_KINDS)
    if unknown:
        ap.error(f"--turn-images: unknown kind(s) {', '.join(sorted(unknown))}; known: {', '.join(IMAGE_KINDS)}")
    args.log_dir = args.log_dir or str(Path(args.json).resolve().parent)
    skip = set(filter(None, args.skip.split(",")))
    clients = [int(x) for x in args.clients.split(",") if x]
    rates = [float(x) for x in args.rates.split(",") if x]
    size = tuple(int(x) for x in args.image.split("x"))
    turn_size = tuple(int(x) for x in args.turn_image.split("x"))

    import torch

    out: dict = {"benchmark": "bench/serve.py", "date": datetime.date.today().isoformat(),
                 "command": " ".join(["python", "bench/serve.py", *(argv if argv is not None else sys.argv[1:])]),
                 "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu else
                 f"CPU ({os.cpu_count()} cores)", "versions": versions(), "model": args.model,
                 "workload": {"image": args.image, "question": QUESTION, "new_tokens": args.tokens,
                              "stagger_s": args.stagger, "clients": clients, "rates": rates,
                              "rate_requests": args.rate_requests, "max_batch_size": args.max_batch_size,
                              "max_model_len": args.max_model_len, "kv_cache_gib": args.kv_cache_gib}}
    Path(args.json).resolve().parent.mkdir(parents=True, exist_ok=True)

    def save():
        tmp = Path(args.json).with_suffix(".json.tmp")
        tmp.write_text(json.dumps(out, indent=2))
        os.replace(tmp, args.json)

    work = Workload(size, args.tokens, Path(args.model).resolve().name)
    warmup = [1, max(clients)] if clients else [1]
    plan = {"clients": clients, "rates": rates, "warmup": warmup, "images": {}}
    for n in warmup:
        plan["images"][f"warmup{n}"] = work.images(n)
    for n in clients:
        plan["images"][f"c{n}"] = work.images(n)
    for rate in rates:
        plan["images"][f"r{rate}"] = work.images(args.rate_requests)
    plan["turns"] = []  # (result key, workload, images): "turns" the noise PNG's, "turns_jpeg" the photo's
    for kind in filter(None, args.turn_images.split(",") if args.conversations else []):
        turn_work = Workload(turn_size, args.tokens, work.model, kind)
        turn_work._seed = 10**6
        images = turn_work.images(args.conversations)
        plan["turns"].append(("turns" if kind == "png" else f"turns_{kind}", turn_work, images))
    save()
    if "http" not in skip:
        http_phase(args, work, plan, out, save)
    if "engine" not in skip:
        engine_phase(args, work, plan, out, save)
    if "http" in out and "engine" in out:
        out["http_vs_engine"] = {k: out["http"][k]["output_tok_s"] / out["engine"][k]["output_tok_s"]
                                 for k in out["http"] if k in out["engine"] and out["engine"][k]["output_tok_s"]}
    ref, ceiling = None, {}
    for ref in ("engine", "http"):  # the engine's single stream (the faster) where it ran
        ceiling = staggered_ceiling(out.get(ref, {}).get("clients_1"), clients, args.stagger, args.tokens)
        if ceiling:
            break
    if ceiling:
        out["staggered_ceiling"] = {"from": f"{ref} clients_1", "tok_s": ceiling,
                                    **{f"{phase}_of_ceiling": {k: out[phase][k]["output_tok_s"] / v
                                                               for k, v in ceiling.items() if k in out[phase] and v}
                                       for phase in ("http", "engine") if phase in out}}
        print("ceiling of staggered clients (no step slower than one client's): "
              + ", ".join(f"{k} {v:.0f} tok/s" for k, v in ceiling.items()), flush=True)
    save()
    shown = ("http_vs_engine", "staggered_ceiling", "turns", "turns_jpeg", "peak_gpu_memory_gib")
    print(json.dumps({k: out[k] for k in shown if k in out}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
