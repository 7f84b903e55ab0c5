"""Probe: where a MoE model's captured batch-1 decode step goes, kernel by kernel (30B-A3B by default).

The fast decode path's step (qvl.infer.decode.DecodeModel, its default implementation and experts) on random bf16
weights, one row at ~1,100 tokens: the step's time from 50 graph replays, then 20 replays under torch.profiler
(kernels inside CUDA graphs are traced), the table by device time. ``bench/decode.py --profile-step`` does the same
within the whole decode benchmark; this runs in ~30 s on a warm machine.

    python bench/experiments/moe_step_profile.py --out $OUT/moe_decode_step.txt
    python bench/experiments/moe_step_profile.py --experts fused --out $OUT/moe_decode_step_fused.txt  # Triton
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from decode import graph_step_ms  # noqa: E402  (bench/decode.py)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="30B-A3B")
    ap.add_argument("--tokens", type=int, default=1100, help="the row's length when the step runs")
    ap.add_argument("--experts", default="auto", help="auto, grouped, gathered or fused (qvl.infer.moe_kernels)")
    ap.add_argument("--impl", default=None, help="pieces or layer (default: the decoder's)")
    ap.add_argument("--out", required=True, help="the profile table goes here")
    args = ap.parse_args(argv)

    from torch.profiler import ProfilerActivity, profile

    from qvl.infer.decode import DecodeModel
    from qvl.models.build import random_model

    t = time.time()
    model, _ = random_model(args.size, dtype=torch.bfloat16, device="cuda")
    model.config._attn_implementation = "sdpa"
    model.eval()
    d = DecodeModel(model, slots=2, max_len=args.tokens + 180)
    d.set_impl(args.impl or d.impl, args.experts)
    ms = graph_step_ms(d, 1, args.tokens)
    head = (f"{args.size} {d.impl}/{d._experts_for(1)} (asked: {args.experts}), batch 1 at {args.tokens} tokens: "
            f"{ms:.3f} ms a step; 21 steps profiled; {torch.cuda.get_device_name()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}\n")
    print(head + f"(built and captured in {time.time() - t:.0f} s)", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graph_step_ms(d, 1, args.tokens, reps=20)
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60)
    Path(args.out).write_text(head + table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
