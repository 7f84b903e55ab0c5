"""Latency and throughput of `qvl serve` on one GPU (H100), 8B shape with random weights.

Measures, through the real HTTP server and the OpenAI streaming API:
  * TTFT: time from sending the request to the first content token (1 client, image + text)
  * decode tok/s for 1 client: (completion tokens - 1) / (last token time - first token time)
  * total tok/s with 8 concurrent clients: all completion tokens / wall time

Random weights never emit <|im_end|> reliably, so every request asks for exactly --tokens
tokens (the model is forced to run to max_tokens: eos is removed from the generation config).

    python bench/serve_latency.py                       # transformers backend, bf16, sdpa
    python bench/serve_latency.py --flash-attn2 --tokens 256 --json out.json

Needs: CUDA GPU with ~20 GB free, `pip install -e '.[serve]'`.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import threading
import time


def image_url(w: int, h: int) -> str:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def one_stream(client, model: str, messages, tokens: int) -> dict:
    t0 = time.perf_counter()
    times, usage = [], None
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=tokens, stream=True,
                                            temperature=0.7, stream_options={"include_usage": True})
    for ev in stream:
        if ev.usage:
            usage = ev.usage
        for ch in ev.choices:
            if ch.delta.content:
                times.append(time.perf_counter())
    n = usage.completion_tokens if usage else len(times)
    return {"ttft": times[0] - t0 if times else float("nan"), "start": t0, "end": time.perf_counter(),
            "tokens": n, "decode_tps": (n - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan"),
            "prompt_tokens": usage.prompt_tokens if usage else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8B")
    ap.add_argument("--tokens", type=int, default=256, help="completion tokens per request")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--image", default="448x448", help="WxH of the request image (448x448 -> 196 visual tokens)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flash-attn2", action="store_true")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    import openai
    import uvicorn

    from qvl.infer.transformers_backend import TransformersEngine
    from qvl.models.build import random_model
    from qvl.serve.app import ServeSettings, create_app

    t = time.time()
    attn = "flash_attention_2" if args.flash_attn2 else "sdpa"
    model, processor = random_model(args.size, dtype=torch.bfloat16, device="cuda")
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:
        model.config._attn_implementation = attn
    model.generation_config.eos_token_id = None  # random weights: run every request to max_tokens
    engine = TransformersEngine(model, processor, name=f"qwen3-vl-{args.size.lower()}-random",
                                max_batch_size=args.max_batch_size)
    engine.eos_ids = set()
    print(f"built {args.size} (random, bf16, {attn}) in {time.time() - t:.0f}s; "
          f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")

    settings = ServeSettings(port=8765, log_level="warning")
    server = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=settings.port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="none", timeout=600,
                           max_retries=0)
    w, h = (int(x) for x in args.image.split("x"))
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url(w, h)}},
                                             {"type": "text", "text": "Describe this image in detail."}]}]

    one_stream(client, engine.name, messages, 16)  # warm-up (CUDA kernels, allocator)
    singles = [one_stream(client, engine.name, messages, args.tokens) for _ in range(args.repeats)]

    def concurrent() -> dict:
        results = [None] * args.clients

        def run(i):
            results[i] = one_stream(client, engine.name, messages, args.tokens)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(args.clients)]
        t0 = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
        total = sum(r["tokens"] for r in results)
        return {"wall_s": wall, "total_tokens": total, "total_tps": total / wall,
                "ttft_p50": statistics.median(r["ttft"] for r in results),
                "ttft_max": max(r["ttft"] for r in results)}

    multi = [concurrent() for _ in range(args.repeats)]
    out = {
        "gpu": torch.cuda.get_device_name(0), "size": args.size, "attn": attn, "tokens": args.tokens,
        "prompt_tokens": singles[0]["prompt_tokens"], "image": args.image,
        "one_client": {"ttft_s": statistics.median(s["ttft"] for s in singles),
                       "decode_tok_s": statistics.median(s["decode_tps"] for s in singles)},
        f"{args.clients}_clients": {"total_tok_s": statistics.median(m["total_tps"] for m in multi),
                                    "ttft_p50_s": statistics.median(m["ttft_p50"] for m in multi),
                                    "ttft_max_s": statistics.median(m["ttft_max"] for m in multi)},
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    server.should_exit = True
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
