"""Probe: qvl.infer.gemv_kernels' Triton GEMV against cuBLAS (F.linear) for one row, per tile choice.

The decode step's projections at 1 row: 30B-A3B's q/k/v (2,048 -> 5,120), o (4,096 -> 2,048) and router (2,048 -> 128),
the 8B's q/k/v (4,096 -> 6,144) and o (4,096 -> 4,096); ``--layers`` copies of each weight (so a call does not find
its weight in the L2 cache), all calls of a variant captured in one CUDA graph and replayed (device time). Reported
per call: microseconds and GB/s of weight read, for cuBLAS and for each (block of output columns, block of the
reduced dimension, warps).

    python bench/experiments/gemv_tiles.py --json $OUT/gemv_tiles.json   (~2 min on an H100)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_kernel_tune import graph_us  # noqa: E402

from qvl.infer import gemv_kernels  # noqa: E402

SHAPES = {"30B-A3B qkv": (5120, 2048), "30B-A3B o": (2048, 4096), "30B-A3B router": (128, 2048),
          "8B qkv": (6144, 4096), "8B o": (4096, 4096)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1", help="rows of x: the kernel takes 1 (gemv_kernels.MAX_ROWS)")
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--block-out", default="4,8,16,32,64")
    ap.add_argument("--block-in", default="128,256,512,1024")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if any(int(r) > gemv_kernels.MAX_ROWS for r in args.rows.split(",") if r):
        ap.error(f"--rows: the kernel takes at most {gemv_kernels.MAX_ROWS} row")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    dev = torch.device("cuda")
    out = {"card": torch.cuda.get_device_name(0), "layers": args.layers, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5 for _ in range(args.layers)]
        gb = n * k * 2 / 1e9
        for rows in ints(args.rows):
            x = torch.randn(rows, k, device=dev, dtype=torch.bfloat16)
            res = {"cublas_us": graph_us(lambda i: F.linear(x, ws[i]), args.layers)}
            tiles = {}
            for bn, bk, warps in itertools.product(ints(args.block_out), ints(args.block_in), ints(args.warps)):
                gemv_kernels.TILE = (bn, bk, warps)
                try:
                    tiles[f"{bn}x{bk}/{warps}"] = graph_us(lambda i: gemv_kernels.gemv(x, ws[i]), args.layers)
                except Exception as e:  # noqa: BLE001 -- e.g. out of resources: recorded
                    tiles[f"{bn}x{bk}/{warps}"] = f"{type(e).__name__}: {str(e)[:100]}"
            timed = {t: us for t, us in tiles.items() if isinstance(us, float)}
            best = min(timed, key=timed.get)
            res.update(best=best, best_us=timed[best], cublas_gb_s=gb / res["cublas_us"] * 1e6,
                       best_gb_s=gb / timed[best] * 1e6, tiles=tiles)
            out["shapes"][f"{name} rows{rows}"] = res
            print(f"{name:16} rows {rows}: cuBLAS {res['cublas_us']:6.1f} us ({res['cublas_gb_s']:5.0f} GB/s), "
                  f"best {best} {timed[best]:6.1f} us ({res['best_gb_s']:5.0f} GB/s)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
