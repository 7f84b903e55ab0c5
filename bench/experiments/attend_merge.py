"""Probe: split-key decode attention (qvl.infer.attend_kernels) with its chunks merged by a second kernel against
merged by the split kernel's last program of each (row, kv head) (``MERGE_IN_SPLIT``).

30B-A3B's heads (32 query, 4 kv, 128 wide), bf16: 1 row x 1,100 keys and 32 rows x 300 (the decode bench's step
shapes), ``--layers`` copies of the cache (so a call does not find its keys in the L2 cache), all calls of a way
captured in one CUDA graph and replayed (device time). Reported per call: microseconds, and the largest difference
of the two ways' outputs.

    python bench/experiments/attend_merge.py --json $OUT/attend_merge.json   (~30 s on an H100)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_kernel_tune import graph_us  # noqa: E402

from qvl.infer import attend_kernels  # noqa: E402

SHAPES = {"rows1_len1100": (1, 1100), "rows32_len300": (32, 300)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_q, n_kv, d = 32, 4, 128
    out = {"probe": "bench/experiments/attend_merge.py", "command": "python " + " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "layers": args.layers, "shapes": {}}
    kept = attend_kernels.MERGE_IN_SPLIT
    try:
        for name, (rows, keys) in SHAPES.items():
            q = torch.randn(rows, n_q, d, device=dev).bfloat16()
            caches = [(torch.randn(rows, n_kv, keys, d, device=dev).bfloat16(),
                       torch.randn(rows, n_kv, keys, d, device=dev).bfloat16()) for _ in range(args.layers)]
            mask = torch.ones(rows, keys, dtype=torch.bool, device=dev)
            row, outputs = {}, {}
            for way, merge in (("merge_kernel", False), ("in_split", True)):
                attend_kernels.MERGE_IN_SPLIT = merge
                row[way] = graph_us(lambda i: attend_kernels.attend(q, *caches[i], mask, d ** -0.5), args.layers)
                outputs[way] = attend_kernels.attend(q, *caches[0], mask, d ** -0.5)
            row["max_abs_diff"] = (outputs["in_split"].float() - outputs["merge_kernel"].float()).abs().max().item()
            out["shapes"][name] = row
            print(name, row, flush=True)
    finally:
        attend_kernels.MERGE_IN_SPLIT = kept
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
