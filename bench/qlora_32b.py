"""QLoRA at 32B on an emulated smaller card: `qvl train`'s loop on examples/qlora_32b_24gb.yaml, the memory planner's
prediction beside the measured peak.

    python bench/qlora_32b.py                                  # the example as shipped, on an emulated RTX 4090
    python bench/qlora_32b.py --set lora_r=64 --set force=true # another setting (force: past the preflight)

The 32B weights are random (nothing downloads): made on the GPU in bf16, moved to host memory, and handed to the loop
in place of the checkpoint load (the 62 GiB folder would not fit the machine's disk); from there the run is the
user's: QVL_GPU caps the allocator to the card (``torch.cuda.set_per_process_memory_fraction``, before anything is
allocated), each linear layer is quantised as it moves to the GPU, the preflight plans the rows the data makes.
The data is bench/workload.py's mix. Reported: steady tok/s (bench/train_cli.py's ``measure``: the steps that
compiled nothing), peak allocated and reserved memory, the planner's total and its tensors-only part beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import train_cli  # noqa: E402
from workload import make_workload  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="32B", help="the official architecture (random weights)")
    ap.add_argument("--example", default="qlora_32b_24gb")
    ap.add_argument("--gpu", default="rtx4090", help="the card emulated (qvl plan gpus); 'none': the whole GPU")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a `qvl train` override")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "qlora_32b_24gb.json"))
    args = ap.parse_args(argv)

    from qvl.models import load as load_mod
    from qvl.models.build import random_model
    from qvl.train import preflight as preflight_mod
    from qvl.train.config import Raw, load_config
    from qvl.train.loop import train

    work = Path(tempfile.mkdtemp(prefix="qvl_qlora_"))
    data = work / "workload"
    make_workload(data, n=args.samples, seed=0)
    registry = work / "datasets.yaml"
    registry.write_text(f"workload:\n  annotation_path: {data / 'workload.jsonl'}\n  data_path: {data}\n")

    t0 = time.time()
    cuda = torch.cuda.is_available()
    if args.size == "tiny":  # a smoke test of this script (CPU)
        from qvl.models.build import tiny_parts

        model, processor = tiny_parts()
    else:
        model, processor = random_model(args.size, dtype=torch.bfloat16, device="cuda" if cuda else "cpu")
    model.to("cpu")  # where a checkpoint load leaves it: the loop quantises each layer on its way to the GPU
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"{args.size}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params made and moved to host "
          f"memory in {time.time() - t0:.0f} s", flush=True)
    model_dir = work / "model"  # config + processor: the planner reads the shape, the loop the processor
    model.config.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)

    overrides = {"model_name_or_path": str(model_dir), "dataset_registry": str(registry), "dataset_use": "workload",
                 "output_dir": str(work / "run"), "max_steps": args.steps, "resume": False, "save_strategy": "no"}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = Raw(value)
    cfg = load_config(REPO / "examples" / f"{args.example}.yaml", overrides)
    if args.gpu != "none" and cuda:
        os.environ["QVL_GPU"] = args.gpu

    plans = []
    check = preflight_mod.check

    def keep_plan(*a, **k):  # the plan the loop's preflight made, kept to set beside the measured peak
        pf = check(*a, **k)
        plans.append(pf)
        return pf

    lines: list[tuple[float, str]] = []
    t_start = time.time()

    def log(msg="", *a, **k):
        lines.append((time.time() - t_start, str(msg)))
        for line in str(msg).splitlines():
            print(f"  {time.time() - t_start:7.1f}s | {line}", flush=True)

    saved = load_mod.load_model, preflight_mod.check
    load_mod.load_model = lambda *a, **k: model
    preflight_mod.check = keep_plan
    error = None
    try:
        train(cfg, log=log)
    except Exception as e:  # an out-of-memory under the cap is a result too
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
        print(error, flush=True)
    finally:
        load_mod.load_model, preflight_mod.check = saved
    res = train_cli.measure(lines, train_cli.read_rows(Path(cfg.output_dir) / "metrics.jsonl"), t_start)
    if cuda:
        res["peak_allocated_now_gib"] = torch.cuda.max_memory_allocated() / 2**30  # also when the run failed
    plan = plans[0].plan if plans and plans[0] is not None else None
    if plan is not None:
        res.update(planned_total_gib=plan.total_gib, planned_allocated_gib=plan.peak_allocated_gib,
                   planned_parts=plan.parts, card_gib=plan.gpu_total_gib)
        if res.get("peak_gib"):
            res["planned_allocated_vs_peak"] = plan.peak_allocated_gib / res["peak_gib"] - 1
    summary = {"size": args.size, "example": args.example, "gpu": args.gpu, "overrides": args.set,
               "steps": args.steps, "samples": args.samples, "error": error, "torch": torch.__version__,
               "card": torch.cuda.get_device_name() if cuda else "cpu", "command": " ".join(sys.argv), **res}
    try:
        import bitsandbytes

        summary["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        pass
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2, default=str))
    print(f"\n{args.size} {args.example} on {args.gpu}: {res['steps']} steps, {res['tokens_per_s']:,.0f} tok/s steady, "
          f"peak {res.get('peak_gib') or 0:.2f} GiB allocated / {res.get('peak_reserved_gib') or 0:.2f} reserved; "
          f"planned {res.get('planned_allocated_gib', float('nan')):.2f} allocated, "
          f"{res.get('planned_total_gib', float('nan')):.2f} in all"
          f"{'; ' + error if error else ''}\nwritten {args.out}", flush=True)
    return summary


if __name__ == "__main__":
    main()
