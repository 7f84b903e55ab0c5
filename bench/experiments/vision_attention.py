"""The vision tower's attention kernels on one step's images and frames (run on an H100).

    python bench/experiments/vision_attention.py --out vision_attention.json

Qwen3-VL-8B's tower has 16 heads of 72 dimensions. The flash kernel torch ships has templates for 64 and 96, so 72
runs the 96 one (a third of its work is padding). This times, per tower forward (27 blocks), the varlen kernels
torch has, on the segments (one per image, one per video frame pair) of steps drawn like the throughput bench's
workload (bench/workload.py: 4 samples a step, images of 200-1,300 merged tokens, 2-image samples, 8-16 frame
videos), forward only (the tower is frozen under LoRA):

  flash      torch's flash-attention varlen (what qvl runs now)
  cudnn      cuDNN's attention with ragged offsets (``aten._cudnn_attention_forward``, cum_seq)
  efficient  the memory-efficient (cutlass) varlen kernel
  triton     a Triton kernel without flash's padding (bench/experiments/segment_attention_triton.py, an experiment that lost:
             25.9 against flash's 16.1 ms per step on an H200), and triton-MxN-Ww-Ss the same with other block
             sizes, warps and pipeline stages

and reports each kernel's time, its FLOP rate (non-causal: 4 x L^2 x head dim x heads per segment), the host time
per call (cuDNN builds a plan per new shape), the largest difference to flash, and whether it compiles.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

HEADS, HEAD_DIM, BLOCKS = 16, 72, 27


def step_segments(rng: random.Random, batch: int = 4) -> tuple[list[int], list[int]]:
    """(image segments, video segments) in patches for one step, drawn as bench/workload.py draws samples."""
    images, videos = [], []
    for _ in range(batch):
        kind = rng.choices(["text", "image", "multi", "video"], weights=[0.2, 0.55, 0.15, 0.1])[0]
        if kind == "image":
            images.append(4 * rng.randint(200, 1300))
        elif kind == "multi":
            images += [4 * rng.randint(150, 500) for _ in range(2)]
        elif kind == "video":
            videos += [4 * 160] * (rng.choice([8, 12, 16]) // 2)
    return images, videos


def cu_of(lengths: list[int], device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def flash(q, k, v, cu, longest):
    return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, 0.0, False, False)[0]


def cudnn(q, k, v, cu, longest):
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, longest, longest, False, 0.0, False)[0]


def efficient(q, k, v, cu, longest):
    out = torch.ops.aten._efficient_attention_forward(q[None], k[None], v[None], None, cu, cu, longest, longest,
                                                      0.0, 0, False)[0]
    return out[0]


def triton_segments(blocks=None):
    """The Triton kernel of bench/experiments/segment_attention_triton.py (an experiment: the tower runs flash) with its
    (BLOCK_M, BLOCK_N, warps, stages) ``blocks`` (default: the ones it picks for this card)."""
    from segment_attention_triton import attend

    return lambda q, k, v, cu, longest: attend(q, k, v, cu, longest, HEAD_DIM ** -0.5, blocks)


KERNELS = {"flash": flash, "cudnn": cudnn, "efficient": efficient, "triton": triton_segments(),
           **{f"triton-{m}x{n}-{w}w{s}s": triton_segments((m, n, w, s))
              for m, n, w, s in [(128, 64, 4, 3), (128, 64, 8, 2), (128, 32, 4, 3)]}}


def time_kernel(fn, segments_per_call: list[list[int]], device) -> dict:
    """GPU ms in all (27 blocks per call) and host ms per call, for the calls' segment lists."""
    gpu_ms, host_s, calls = 0.0, 0.0, 0
    for lengths in segments_per_call:
        total, longest = sum(lengths), max(lengths)
        q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
        cu = cu_of(lengths, device)
        fn(q, k, v, cu, longest)  # first call of this shape (a cuDNN plan) is not timed
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        for _ in range(BLOCKS):
            fn(q, k, v, cu, longest)
        end.record()
        host_s += time.perf_counter() - t0
        torch.cuda.synchronize()
        gpu_ms += start.elapsed_time(end)
        calls += BLOCKS
    return {"gpu_ms": gpu_ms, "host_ms_per_call": host_s / calls * 1e3}


def first_call_ms(fn, device, longest_values: list[int]) -> float:
    """Host ms of the first call at each new longest length (a new plan for cuDNN), averaged."""
    times = []
    for n in longest_values:
        q, k, v = (torch.randn(n, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
        cu = cu_of([n], device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(q, k, v, cu, n)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sum(times) / len(times)


def compiles(fn, device) -> str:
    """Whether the kernel runs inside torch.compile with dynamic lengths (the tower is compiled whole)."""
    try:
        compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        for lengths in ([1000, 2000], [3000, 500, 700]):
            q, k, v = (torch.randn(sum(lengths), HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16)
                       for _ in range(3))
            cu = cu_of(lengths, device)
            diff = (compiled(q, k, v, cu, max(lengths)).float() - flash(q, k, v, cu, max(lengths)).float()).abs().max()
        return f"yes (max diff to eager flash {float(diff):.2e})"
    except Exception as e:  # recorded, the bench goes on
        return f"no: {type(e).__name__}: {str(e).splitlines()[0][:200]}"


def table_line(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<22} {r['error']}"
    return (f"{name:<22}{r['apart_gpu_ms_per_step']:>10.2f}{r['together_gpu_ms_per_step']:>13.2f}"
            f"{r['tflops_together']:>9.0f}{r['host_ms_per_call']:>14.3f}{r['first_call_ms_new_length']:>15.2f}"
            f"{r['max_abs_diff_to_flash']:>10.1e}  {r['compiles']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="vision_attention.json")
    ap.add_argument("--kernels", default="", help=f"comma list of kernels to time (default all: {', '.join(KERNELS)})")
    args = ap.parse_args()
    kernels = {k: KERNELS[k] for k in args.kernels.split(",")} if args.kernels else KERNELS
    device = torch.device("cuda")
    rng = random.Random(0)
    steps = [step_segments(rng) for _ in range(args.steps)]
    # as the tower is called now: images and videos apart; and one call per step for both
    apart = [s for img, vid in steps for s in (img, vid) if s]
    together = [img + vid for img, vid in steps if img + vid]
    flops = sum(4 * n * n * HEAD_DIM * HEADS for lengths in together for n in lengths) * BLOCKS
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "steps": args.steps, "heads": HEADS, "head_dim": HEAD_DIM,
              "blocks": BLOCKS, "patches_per_step": sum(map(sum, together)) / args.steps,
              "attention_tflop_per_step": flops / args.steps / 1e12, "kernels": {}}
    # correctness on one call's shapes first
    lengths = together[0]
    q, k, v = (torch.randn(sum(lengths), HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu = cu_of(lengths, device)
    ref = flash(q, k, v, cu, max(lengths)).float()
    for name, fn in kernels.items():
        row: dict = {}
        try:
            row["max_abs_diff_to_flash"] = float((fn(q, k, v, cu, max(lengths)).float() - ref).abs().max())
            apart_t = time_kernel(fn, apart, device)
            together_t = time_kernel(fn, together, device)
            row["apart_gpu_ms_per_step"] = apart_t["gpu_ms"] / args.steps
            row["together_gpu_ms_per_step"] = together_t["gpu_ms"] / args.steps
            row["host_ms_per_call"] = apart_t["host_ms_per_call"]
            row["tflops_together"] = flops / args.steps / (row["together_gpu_ms_per_step"] / 1e3) / 1e12
            row["first_call_ms_new_length"] = first_call_ms(fn, device, [1111, 2222, 3333, 4444])
            row["compiles"] = compiles(fn, device)
        except Exception as e:  # a kernel this torch / card lacks: recorded
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        result["kernels"][name] = row
        print(name, json.dumps(row), flush=True)
    print(f"\n{result['card']}, torch {result['torch']}, cuDNN {result['cudnn']}: {args.steps} steps, "
          f"{result['patches_per_step']:.0f} patches and {result['attention_tflop_per_step']:.2f} TFLOP of tower "
          f"attention per step ({BLOCKS} blocks, {HEADS} heads x {HEAD_DIM})")
    print(f"{'kernel':<22}{'apart ms':>10}{'together ms':>13}{'TFLOP/s':>9}{'host ms/call':>14}{'new length ms':>15}"
          f"{'max diff':>10}  compiles")
    print("\n".join(table_line(name, r) for name, r in result["kernels"].items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
