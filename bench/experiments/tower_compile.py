"""How long does the frozen vision tower's cold compile take, with its blocks as one nested compile region and
without (the whole forward unrolled), and does the compiled tower give the eager tower's output?

Each case runs in its own process with an empty inductor cache (a cold compile, as a user's first run), on the
official config's tower with random weights (compile time does not depend on weight values):
``qvl.train.compile.compile_vision_tower`` as training calls it, then three calls (one image; two images; three
media, a two-frame video among them) through ``qvl.train.row_forward.run_tower``, then the last again three times. Reported per case: the compile
(seconds, graphs, any fallback to eager), where the seconds went (dynamo's trace, AOTAutograd, inductor's lowering
and code generation, the wait for compiled kernels), each call's time, and the largest difference from eager.

    python bench/experiments/tower_compile.py --device cpu --json bench/experiments/results/tower_compile_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRIDS = ([[1, 16, 16]], [[1, 8, 12], [1, 16, 8]], [[1, 24, 16], [2, 8, 8]])
# dynamo's own phase names (torch._dynamo.utils.compile_times), in the order a compile runs them
PHASES = {"trace": "bytecode_tracing", "aot": "create_aot_dispatcher_function", "inductor": "compile_fx_inner",
          "codegen": "GraphLowering.codegen", "kernel_compile_wait": "async_compile.wait",
          "cpp_compile": "compile_file"}


def child(args) -> dict:
    import torch
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from qvl.models.attention import use_vision_sdpa
    from qvl.models.build import official_config
    from qvl.train import compile as compile_mod
    from qvl.train.row_forward import run_tower, vision_extras

    config = official_config(args.size)
    vc = config.vision_config
    if args.depth:
        vc.depth = args.depth
        vc.deepstack_visual_indexes = [i for i in vc.deepstack_visual_indexes if i < args.depth]
    vc._attn_implementation = "sdpa"
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    visual = Qwen3VLVisionModel._from_config(vc, dtype=dtype).to(device).eval().requires_grad_(False)

    class Holder(torch.nn.Module):  # what compile_vision_tower and use_vision_sdpa look through
        def __init__(self):
            super().__init__()
            self.visual, self.config = visual, config

    holder = Holder()
    use_vision_sdpa(holder)
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2

    def call(grid):
        grid = torch.tensor(grid)
        torch.manual_seed(int(grid.sum()))
        pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, dtype=dtype)
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vision_extras(grid, vc).items()}
        with torch.no_grad():
            out = run_tower(visual, pixels.to(device), grid.to(device), kw).pooler_output
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out.float().cpu()

    eager = [call(g) for g in GRIDS]
    if args.case == "whole":
        compile_mod._BLOCK_REGION = None
    assert compile_mod.compile_vision_tower(holder), "the tower did not compile"
    mark = compile_mod.compile_marker()
    calls = []
    for grid, ref in zip(GRIDS, eager):
        t0 = time.perf_counter()
        out = call(grid)
        calls.append({"grid": grid, "seconds": round(time.perf_counter() - t0, 3),
                      "max_abs_diff_vs_eager": float((out - ref).abs().max())})
    t0 = time.perf_counter()
    for _ in range(3):  # the last shapes again: no compile, the compiled tower's own speed
        call(GRIDS[-1])
    steady = (time.perf_counter() - t0) / 3
    from torch._dynamo.utils import compilation_time_metrics as times, get_compilation_metrics

    records = [m for m in get_compilation_metrics() if id(m) not in mark]
    return {"case": args.case, "torch": torch.__version__, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "dtype": args.dtype, "blocks": vc.depth,
            "compile_s": round(sum(m.entire_frame_compile_time_s or 0 for m in records), 2),
            "graphs": len(records), "fallbacks": [m.fail_type for m in records if m.fail_type],
            "phases_s": {k: round(sum(times.get(name, [0.0])), 2) for k, name in PHASES.items()},
            "calls": calls, "steady_call_s": round(steady, 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8B")
    p.add_argument("--depth", type=int, default=0, help="blocks (0: the config's)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cases", default="whole,region")
    p.add_argument("--json", type=Path)
    p.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a child process
    args = p.parse_args(argv)
    if args.case:
        print("RESULT " + json.dumps(child(args)))
        return
    rows = []
    for case in args.cases.split(","):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TORCHINDUCTOR_FX_GRAPH_CACHE="0")
            cmd = [sys.executable, __file__, "--case", case, "--size", args.size, "--depth", str(args.depth),
                   "--device", args.device, "--dtype", args.dtype]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"case {case} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            row = json.loads(lines[-1][len("RESULT "):])
            row["process_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{case:>6}: compile {row['compile_s']:6.1f} s in {row['graphs']} graph(s), fallbacks "
              f"{row['fallbacks'] or 'none'}; phases {row['phases_s']}; calls "
              f"{[c['seconds'] for c in row['calls']]} s, then {row['steady_call_s']} s; max diff vs eager "
              f"{max(c['max_abs_diff_vs_eager'] for c in row['calls']):.3g}")
    if len(rows) == 2 and rows[1]["compile_s"]:
        print(f"compile {rows[0]['case']} / {rows[1]['case']}: {rows[0]['compile_s'] / rows[1]['compile_s']:.2f}x")
    if args.json:
        out = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
               "date": time.strftime("%Y-%m-%d"), "rows": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1) + "\n")
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
