"""Where a batch-1 decode step's time goes: the captured step's kernels, their bandwidth, and the idle time between.

    python bench/experiments/decode_kernels.py --size 8B --out decode_kernels.json     # one GPU, ~2 min
    python bench/experiments/decode_kernels.py --size tiny --device cpu              # smoke: no kernels, just runs

The fast decode path (``qvl.infer.decode``) replays one CUDA graph per step. At batch 1 it should read its weights
at the card's copy bandwidth; on an H200 it read 15.14 GB in 5.39 ms (2.8 TB/s, 65 % of the 4.28 TB/s copy,
2026-12-04, bench/results/serve.json's engine rows). The step is profiled over ``--reps`` replays at one row of
``--length`` cached tokens and split into:

  * **matmul kernels** (cuBLAS / CUTLASS / nvjet GEMV and GEMM): their time, and the weight bytes over that time;
    the kernel names and mean durations show which variant cuBLAS picked for M = 1 and whether a weight's matmul
    is split (split-K) or runs at low occupancy;
  * **other kernels** (attention over the cache, the compiled norms / RoPE / residual adds, sampling's argmax):
    their time by name;
  * **idle**: the replay's wall time minus the time some kernel ran: launch gaps inside the graph (one per kernel,
    so the kernel count is reported too).

Answers "GEMV kernel choice at M=1, launches per layer, sampling, host sync" of issue 28 with numbers instead of
guesses; the step's implementation (``--impl pieces|layer``: compiled pieces or one compiled function per layer)
can be compared in one call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

MATMUL_MARKS = ("gemv", "gemm", "cutlass", "nvjet", "xmma", "splitk", "sm90_", "sm100_")


def is_matmul(name: str) -> bool:
    low = name.lower()
    return any(m in low for m in MATMUL_MARKS) and "flash" not in low


def kernel_summary(kernels: list[tuple[str, float, float]], replays: int, wall_s: float, weight_bytes: int) -> dict:
    """``kernels``: (name, start µs, duration µs) of every kernel in ``replays`` replays that took ``wall_s`` in all.
    Per replay: kernel count, busy time (the union of kernel intervals), idle = wall - busy, matmul time and the
    weight bytes over it, and the kernels by total time."""
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, _, dur in kernels:
        by_name[name].append(dur)
    busy = 0.0
    end = float("-inf")
    for _, start, dur in sorted(kernels, key=lambda k: k[1]):
        if start >= end:
            busy += dur
        elif start + dur > end:
            busy += start + dur - end
        end = max(end, start + dur)
    per = 1.0 / max(replays, 1)
    matmul_us = sum(sum(d) for n, d in by_name.items() if is_matmul(n)) * per
    wall_us = 1e6 * wall_s * per
    rows = sorted(((n, len(d) * per, sum(d) * per, sum(d) / len(d)) for n, d in by_name.items()),
                  key=lambda r: -r[2])
    return {"replays": replays, "step_ms": wall_us / 1e3, "kernels_per_step": len(kernels) * per,
            "busy_ms": busy * per / 1e3, "idle_ms": max(wall_us - busy * per, 0.0) / 1e3,
            "matmul_ms": matmul_us / 1e3,
            "other_kernels_ms": (sum(sum(d) for d in by_name.values()) * per - matmul_us) / 1e3,
            "weight_gb": weight_bytes / 1e9,
            "matmul_tb_s": weight_bytes / (matmul_us * 1e-6) / 1e12 if matmul_us else None,
            "step_tb_s": weight_bytes / (wall_us * 1e-6) / 1e12 if wall_us else None,
            "kernels": [{"name": n[:120], "per_step": c, "ms_per_step": t / 1e3, "mean_us": m,
                         "matmul": is_matmul(n)} for n, c, t, m in rows[:40]]}


def profile_step(decoder, length: int, reps: int) -> tuple[list[tuple[str, float, float]], float]:
    """Profile ``reps`` batch-1 steps at ``length`` cached tokens: (kernels, wall seconds of the replays)."""
    from torch.profiler import ProfilerActivity, profile

    decoder.busy.add(0)
    decoder.host_length[0] = length
    decoder.length[:1] = length
    for _ in range(3):
        decoder.decode(1)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        for _ in range(reps):
            decoder.decode(1)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    decoder.release(0)
    kernels = [(e.name, e.time_range.start, e.time_range.end - e.time_range.start)
               for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return kernels, wall


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="8B", help="8B, 2B, ... (random weights) or tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--length", type=int, default=1100, help="cached tokens of the one row (decode.py's batch-1 prompt)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--impl", default="pieces,layer", help="step implementations to profile (qvl.infer.decode)")
    ap.add_argument("--out", default="decode_kernels.json")
    args = ap.parse_args(argv)

    from decode import decode_weight_bytes

    from qvl.infer.transformers_backend import TransformersEngine

    if args.size == "tiny":
        from qvl.models.build import tiny_parts

        model, processor = tiny_parts()
        model = model.to(args.device)
    else:
        from qvl.models.build import random_model

        model, processor = random_model(args.size, dtype=torch.bfloat16, device=args.device)
    model.config._attn_implementation = "sdpa"
    model.eval()
    engine = TransformersEngine(model, processor, name="probe", max_model_len=args.length + 64, max_batch_size=1,
                                fast=True, say=print)
    decoder = engine.batcher.decoder
    if decoder is None:
        print("no fast decode path for this model")
        return 1
    decoder.warmup(max_keys=args.length + 16)
    out = {"probe": "bench/experiments/decode_kernels.py", "command": "python " + " ".join(sys.argv),
           "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "size": args.size, "length": args.length,
           "impls": {}}
    weight_bytes = decode_weight_bytes(model)
    for impl in filter(None, args.impl.split(",")):
        try:
            decoder.set_impl(impl)
            kernels, wall = profile_step(decoder, args.length, args.reps)
            out["impls"][impl] = kernel_summary(kernels, args.reps, wall, weight_bytes)
        except Exception as e:  # noqa: BLE001 -- one implementation failing leaves the other's numbers
            out["impls"][impl] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        r = out["impls"][impl]
        print(impl, json.dumps({k: v for k, v in r.items() if k != "kernels"}), flush=True)
        for k in r.get("kernels", [])[:12]:
            print(f"  {k['ms_per_step']:7.3f} ms  x{k['per_step']:5.0f}  {k['mean_us']:8.1f} us  "
                  f"{'M' if k['matmul'] else ' '} {k['name'][:90]}")
    Path(args.out).write_text(json.dumps(out, indent=2))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
