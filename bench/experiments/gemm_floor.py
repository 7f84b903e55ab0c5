"""The matmul floor of a LoRA training step: the LLM's frozen linears alone, at a given row length (run on a GPU).

    python bench/experiments/gemm_floor.py --model 8B --tokens 2750,5500,11000

For LoRA the base weights get no gradient, so each frozen linear costs two matmuls per step: the forward
(x @ W^T) and the input gradient (dy @ W); every recomputed layer adds its forward once more. This times exactly
those bf16 matmuls, back to back with nothing else, and prints what MFU they alone would give (4 x LLM non-embedding
parameters per token over --peak TFLOP/s, the definition bench/train_throughput.py uses). A training step cannot
beat this floor: whatever the step measures above it is attention, the vision tower, elementwise work, recompute,
the optimizer and the host.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from qvl.models.sizes import get_size  # noqa: E402


def linear_shapes(size) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linears: q, k, v, o, gate, up, down."""
    h, heads, kv, inter = size.text_hidden, size.text_heads, size.text_kv_heads, size.text_intermediate
    head_dim = 128
    return [(heads * head_dim, h), (kv * head_dim, h), (kv * head_dim, h), (h, heads * head_dim),
            (inter, h), (inter, h), (h, inter)]


def time_layer(shapes, tokens: int, recompute: bool, reps: int) -> float:
    """Seconds for one layer's forward (+ recompute) and input-gradient matmuls at ``tokens`` rows."""
    dev = torch.device("cuda")
    weights = [torch.randn(o, i, device=dev, dtype=torch.bfloat16) * 0.02 for o, i in shapes]
    xs = [torch.randn(tokens, i, device=dev, dtype=torch.bfloat16) for _, i in shapes]
    gs = [torch.randn(tokens, o, device=dev, dtype=torch.bfloat16) for o, _ in shapes]

    def once():
        for _ in range(2 if recompute else 1):
            for w, x in zip(weights, xs):
                torch.mm(x, w.t())
        for w, g in zip(weights, gs):
            torch.mm(g, w)

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        once()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8B")
    ap.add_argument("--tokens", default="2750,5500,11000", help="comma list of row lengths")
    ap.add_argument("--peak", type=float, default=790.0, help="dense bf16 TFLOP/s the MFU is counted against")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    size = get_size(args.model)
    shapes = linear_shapes(size)
    params = sum(o * i for o, i in shapes) * size.text_layers
    rows = []
    print(f"{torch.cuda.get_device_name()}: {args.model}, {size.text_layers} layers, {params / 1e9:.2f} B linear params")
    print(f"{'tokens':>7} {'recompute':>9} {'step s':>8} {'tok/s':>8} {'TFLOP/s':>8} {'MFU':>6}")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for recompute in (False, True):
            s = time_layer(shapes, tokens, recompute, args.reps) * size.text_layers
            tok_s = tokens / s
            mfu = tok_s * 4 * params / (args.peak * 1e12)
            flops = (6 if recompute else 4) * params * tokens / s / 1e12
            rows.append(dict(tokens=tokens, recompute=recompute, step_s=s, tokens_per_s=tok_s, tflops=flops, mfu=mfu))
            print(f"{tokens:>7} {str(recompute):>9} {s:>8.4f} {tok_s:>8.0f} {flops:>8.0f} {mfu:>6.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "model": args.model,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
