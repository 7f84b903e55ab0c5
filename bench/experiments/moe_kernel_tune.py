"""Probe: how fast are qvl.infer.moe_kernels' Triton experts against the grouped GEMM, per tile choice, at a few rows?

One 30B-A3B-sized MoE layer's experts (128 experts, hidden 2,048, intermediate 768, top-8; bf16 random weights),
``--layers`` copies of them (so the rows an expert reads are not still in the L2 cache from the call before), each
with its own routed rows. Each variant's calls over all copies are captured in a CUDA graph and replayed (device time,
no launch gaps from the host): the grouped path (qvl.infer.decode.experts_grouped, the decode default above 1 row), the gathered
one (compiled, as decode runs it), and each fused kernel (gate_up, down) alone for every (block of output
columns, block of the reduced dimension, warps) choice, then both on their best tiles (compiled); the router's top-k
likewise (the Hugging Face softmax / top-k / renormalise against the route kernel). Reported per layer: microseconds, and GB/s of
the expert rows the rows' distinct experts hold (each read once: the least any way must read). The best tile choice
is printed as the lines to put in qvl/infer/moe_kernels.py.

    python bench/experiments/moe_kernel_tune.py --json $OUT/moe_kernel_tune.json   (~1-2 min on an H100)
    TRITON_INTERPRET=1 python bench/experiments/moe_kernel_tune.py --device cpu --experts 8 --hidden 64 --inter 32 \
        --top-k 2 --layers 2 --rows 1,2 --block-out 16 --block-in 32 --warps 4   # a smoke test (eager timings)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from qvl.infer import moe_kernels  # noqa: E402
from qvl.infer.decode import experts_gathered, experts_grouped, router_top_k  # noqa: E402


def graph_us(fn, calls: int, reps: int = 20) -> float:
    """Microseconds a call of ``fn(i)`` (i = 0..calls-1) takes, replayed as one CUDA graph of all the calls (on a CPU:
    the calls run eagerly, for a smoke test)."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        for i in range(calls):
            fn(i)
        return (time.perf_counter() - t) * 1e6 / calls
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(calls):  # compile / autotune / allocate outside the capture
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * calls)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--layers", type=int, default=8, help="weight copies the calls go round")
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--block-out", default="8,16,32,64")
    ap.add_argument("--block-in", default="128,256,512")
    ap.add_argument("--warps", default="2,4,8")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    e, hid, inter, k = args.experts, args.hidden, args.inter, args.top_k
    g = torch.Generator(device=dev).manual_seed(0)
    layers = [((torch.randn(e, 2 * inter, hid, device=dev, generator=g) / hid ** 0.5).bfloat16(),
               (torch.randn(e, hid, inter, device=dev, generator=g) / inter ** 0.5).bfloat16(),
               torch.randn(e, hid, device=dev, generator=g).bfloat16()) for _ in range(args.layers)]
    expert_bytes = 3 * hid * inter * 2
    out = {"probe": "bench/experiments/moe_kernel_tune.py", "command": "python " + " ".join(sys.argv),
           "date": time.strftime("%Y-%m-%d"), "card": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "torch": torch.__version__,
           "shape": vars(args), "rows": {}}
    best_overall = {}
    for rows in (int(r) for r in args.rows.split(",")):
        h = [torch.randn(rows, hid, device=dev, generator=g).bfloat16() for _ in layers]
        routed = [router_top_k(x, router, k) for x, (_, _, router) in zip(h, layers)]
        distinct = sum(int(ids.unique().numel()) for _, ids in routed) / len(routed)
        floor_bytes = distinct * expert_bytes

        def experts_call(run):
            return lambda i: run(h[i], routed[i][0], routed[i][1], layers[i][0], layers[i][1])

        row = {"distinct_experts": distinct, "us": {}}
        row["us"]["grouped"] = graph_us(experts_call(experts_grouped), len(layers))
        # as decode runs it: compiled into one kernel (eager it copies every pair's expert in float32)
        row["us"]["gathered"] = graph_us(experts_call(torch.compile(experts_gathered, dynamic=False)), len(layers))
        tiles = {}
        sweep = list(itertools.product(*(map(int, a.split(",")) for a in (args.block_out, args.block_in, args.warps))))
        if not moe_kernels.available(dev):  # the op would run the plain path: no kernel timings to show
            print("the Triton kernels do not run here (no Triton, or a CPU without TRITON_INTERPRET=1)", flush=True)
            sweep = []
        else:
            # compiled, as decode runs it: the k-sum is one small kernel (decode's residual add takes it in)
            fused = torch.compile(moe_kernels.experts, dynamic=False)
            acts = [moe_kernels.launch_gate_up(h[i], routed[i][1], layers[i][0]) for i in range(len(layers))]
            row["us"]["fused/default"] = graph_us(experts_call(fused), len(layers))
        for tile in sweep:  # each kernel alone, per tile: the best of each is a separate choice
            name = "{}x{}/w{}".format(*tile)
            tiles[name] = tile
            for kernel, call in (("gate_up", lambda i: moe_kernels.launch_gate_up(h[i], routed[i][1], layers[i][0],
                                                                                  tile)),
                                 ("down", lambda i: moe_kernels.launch_down(acts[i], *routed[i], layers[i][1], tile)),
                                 ("down_sum", lambda i: moe_kernels.launch_down_sum(acts[i], *routed[i], layers[i][1],
                                                                                    h[i], tile))):
                if kernel == "down_sum" and tile[0] * tile[1] * k > 32768:  # a block of all k experts: registers
                    continue
                try:
                    row["us"][f"{kernel}/{name}"] = graph_us(call, len(layers))
                except Exception as err:  # noqa: BLE001 -- a tile the card cannot run: recorded, the sweep goes on
                    row["us"][f"{kernel}/{name}"] = f"{type(err).__name__}: {str(err)[:120]}"
        best = {}
        for kernel in ("gate_up", "down", "down_sum"):
            timed = {n: us for n, us in row["us"].items() if n.startswith(kernel + "/") and isinstance(us, float)}
            best[kernel] = min(timed, key=timed.get).split("/", 1)[1] if timed else None
        if all(best.values()):  # the kernels on their best tiles, as the decoder would run them
            default = moe_kernels.GATE_UP_TILE, moe_kernels.DOWN_TILE, moe_kernels.DOWN_SUM_TILE
            moe_kernels.GATE_UP_TILE, moe_kernels.DOWN_TILE, moe_kernels.DOWN_SUM_TILE = (
                tiles[best["gate_up"]], tiles[best["down"]], tiles[best["down_sum"]])
            row["us"]["fused/best"] = graph_us(experts_call(torch.compile(moe_kernels.experts, dynamic=False)),
                                               len(layers))
            # the layer's residual added too: the compiled k-sum + add after the down kernel, or the down_sum kernel
            sum_in_down = moe_kernels.SUM_IN_DOWN
            for name, in_down in (("added/after", False), ("added/in_down", True)):
                moe_kernels.SUM_IN_DOWN = in_down
                added = torch.compile(lambda x, *a: moe_kernels.experts(x, *a, residual=x), dynamic=False)
                row["us"][name] = graph_us(experts_call(added), len(layers))
            moe_kernels.SUM_IN_DOWN = sum_in_down
            moe_kernels.GATE_UP_TILE, moe_kernels.DOWN_TILE, moe_kernels.DOWN_SUM_TILE = default
        timed = {name: us for name, us in row["us"].items() if isinstance(us, float)}
        row["gb_s"] = {name: floor_bytes / (us * 1e-6) / 1e9 for name, us in timed.items()
                       if name in ("grouped", "gathered", "fused/default", "fused/best")}
        row["best_tiles"] = best
        fused = {name: us for name, us in timed.items() if name.startswith("fused")}
        added = {name: round(us, 1) for name, us in timed.items() if name.startswith("added")}
        row["best_fused"] = min(fused, key=fused.get) if fused else None
        # the router's GEMM in both
        row["route_us"] = {"router_top_k": graph_us(lambda i: router_top_k(h[i], layers[i][2], k), len(layers)),
                           "route_kernel": graph_us(lambda i: moe_kernels.route(F.linear(h[i], layers[i][2]), k),
                                                    len(layers))}
        if moe_kernels.available(dev):  # the top-k in its own kernel before the experts, or inside gate_up
            logits = [F.linear(h[i], layers[i][2]) for i in range(len(layers))]
            route_in_gate_up = moe_kernels.ROUTE_IN_GATE_UP
            for name, on in (("route_then_experts", False), ("routed_in_gate_up", True)):
                moe_kernels.ROUTE_IN_GATE_UP = on
                routed = torch.compile(moe_kernels.routed_experts, dynamic=False)
                row["route_us"][name] = graph_us(lambda i: routed(h[i], logits[i], k, layers[i][0], layers[i][1]),
                                                 len(layers))
            moe_kernels.ROUTE_IN_GATE_UP = route_in_gate_up
        out["rows"][rows] = row
        best_overall[rows] = {kernel: tiles.get(name) for kernel, name in best.items()}
        per_kernel = ", ".join(f"{kernel} {name} {row['us'][f'{kernel}/{name}']:.1f} us" for kernel, name in best.items()
                               if name)
        print(f"{rows} rows ({distinct:.1f} experts, {floor_bytes / 1e6:.0f} MB): grouped {row['us']['grouped']:.1f} us, "
              f"gathered {row['us']['gathered']:.1f}, fused default {fused.get('fused/default', 0):.1f}, best tiles "
              f"{fused.get('fused/best', 0):.1f} us ({per_kernel}); route "
              f"{row['route_us']['router_top_k']:.1f} -> {row['route_us']['route_kernel']:.1f} us; route + experts "
              f"{row['route_us'].get('route_then_experts', 0):.1f}, in gate_up "
              f"{row['route_us'].get('routed_in_gate_up', 0):.1f} us; with the residual "
              f"{added} us", flush=True)
    if best_overall.get(1) and all(best_overall[1].values()):
        print("for qvl/infer/moe_kernels.py (best at 1 row): GATE_UP_TILE = {}; DOWN_TILE = {}; DOWN_SUM_TILE = {}"
              .format(best_overall[1]["gate_up"], best_overall[1]["down"], best_overall[1]["down_sum"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
