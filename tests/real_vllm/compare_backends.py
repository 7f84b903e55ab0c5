"""The same prompts through `qvl serve --backend vllm` and `--backend transformers`: outputs and timings.

    .venv-vllm/bin/python tests/real_vllm/compare_backends.py [--model DIR] [--tokens 32] [--repeats 3]

Starts both servers on one model (default: the tiny model's demo variant, built into a temporary folder),
sends each prompt greedily (max_tokens, ignore_eos) `--repeats` times to each, and prints a Markdown table:
the answer (first characters) and the median seconds per request of each backend, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from servers import QvlServer  # noqa: E402
from serve_helpers import data_url, make_mp4, png_bytes  # noqa: E402


def prompts(folder: Path) -> dict[str, list[dict]]:
    def image(color):
        return {"type": "image_url", "image_url": {"url": data_url(png_bytes(64, 48, color), "image/png")}}

    video = {"type": "video_url", "video_url": {"url": data_url(Path(make_mp4(folder / "clip.mp4")).read_bytes(),
                                                                "video/mp4")}}
    return {
        "text": [{"role": "user", "content": "What colour is a red square?"}],
        "one image": [{"role": "user", "content": [image((200, 30, 30)), {"type": "text", "text": "Colour?"}]}],
        "two images": [{"role": "user", "content": [image((200, 30, 30)), image((30, 30, 200)),
                                                    {"type": "text", "text": "Which is blue?"}]}],
        "video (8 frames)": [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"}]}],
    }


def timed(server, messages, tokens: int) -> tuple[float, dict]:
    import httpx

    body = {"model": "tiny", "messages": messages, "max_tokens": tokens, "temperature": 0, "presence_penalty": 0,
            "ignore_eos": True}
    start = time.perf_counter()
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=600)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    return seconds, r.json()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint folder named tiny (default: build the tiny demo variant)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qvl-compare-"))
    model = Path(args.model) if args.model else work / "tiny"
    if not args.model:
        from qvl.models.build import build_tiny

        build_tiny(model, variant="demo")
    common = ["-c", str(model), "--max-model-len", "4096", "--server-name", "127.0.0.1", "--server-port", "{port}"]
    servers = {}
    try:
        servers["vllm"] = QvlServer(common + ["--backend", "vllm"], work / "vllm.log", {"VLLM_CPU_KVCACHE_SPACE": "1"})
        servers["transformers"] = QvlServer(common + ["--backend", "transformers"], work / "transformers.log")
        rows = []
        for name, messages in prompts(work).items():
            row = {"prompt": name}
            for backend, server in servers.items():
                timed(server, messages, args.tokens)  # warm-up (first-shape costs)
                runs = [timed(server, messages, args.tokens) for _ in range(args.repeats)]
                row[backend] = {"seconds": statistics.median(s for s, _ in runs), "text": runs[0][1]["choices"][0][
                    "message"]["content"], "usage": runs[0][1]["usage"]}
            rows.append(row)
    finally:
        for s in servers.values():
            s.stop()
    print(f"startup: vllm {servers['vllm'].startup_s:.1f} s, transformers {servers['transformers'].startup_s:.1f} s")
    print(f"\n| prompt | prompt tokens | vLLM answer ({args.tokens} tokens, first 24 chars) | same answer | "
          "vLLM s/request | transformers s/request | vLLM / transformers |")
    print("|---|---:|---|---|---:|---:|---:|")
    for r in rows:
        v, t = r["vllm"], r["transformers"]
        same = v["text"] == t["text"] or v["text"] == t["text"].rstrip("\ufffd")
        print(f"| {r['prompt']} | {v['usage']['prompt_tokens']} | `{json.dumps(v['text'][:24])[1:-1]}` | "
              f"{'yes' if same else 'NO'} | {v['seconds']:.3f} | {t['seconds']:.3f} | "
              f"{v['seconds'] / t['seconds']:.2f} |")
    print("\n" + json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
