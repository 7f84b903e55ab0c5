"""`qvl train` on 1 and 2 GPUs with each engine, through the real CLI (`python -m qvl.train ... nproc=N`).

    python bench/multigpu.py --cases parity --out $OUT/multigpu.json            # 2B, 30 steps, 1 vs 2 GPUs
    python bench/multigpu.py --cases scaling,full8b --out $OUT/multigpu.json    # tokens/s 1 -> 2 GPUs; 8B ZeRO-3
    python bench/multigpu.py --cases parity --model tiny --steps 3 --out /tmp/mg.json   # CPU smoke run

Cases (random-weight official shapes, the seeded mixed workload of bench/workload.py: 20 % text-only,
55 % one image, 15 % two images, 10 % videos; global batch identical for 1 and 2 GPUs):
  parity   2B full fine-tune (vision tower too, per-component LRs), per-device batch 1, 30 steps:
           1 GPU (gradient accumulation 4) vs 2 GPUs (accumulation 2), each engine. Batch 1 puts a
           text-only micro-batch on one rank while the other has images or video in many steps (counted
           from qvl's own sampler): these runs are also the mixed-modality no-hang check (timeout per run).
  scaling  tokens/s and peak memory per GPU, 1 -> 2 GPUs, packed rows (data_flatten): LoRA-8B
           (DDP, ZeRO-2) and full-4B (ZeRO-2, FSDP2); steady state after 3 warm-up steps.
  moe      LoRA (r 16, attention and every expert through peft target_parameters) on the 30B-A3B MoE shape:
           1 GPU (DDP path) when it fits, then 2 GPUs with each --moe-engines engine (ZeRO-2 is the
           official recipe's limit; ZeRO-3 / FSDP2 shard the experts): steps, tok/s, peak memory per GPU.
  full8b   full fine-tune of the 8B shape on 2 GPUs: ZeRO-3 with bf16 master weights and states (zero3_bf16;
           fp32 ones need 4 x 80 GB), then ZeRO-3 with CPU offload of fp32 states and the weights.
Engine names: ddp, zero2, zero3, zero3_offload, fsdp, and zero2_bf16 / zero3_bf16 / fsdp_bf16 (master_weights: bf16).
Two 1-GPU runs share the machine at a time (one per GPU); 2-GPU runs run alone.
Every run has a timeout; a run that times out is recorded as such (a hang turns into a failure).
Results are written after every run, so a call cut short still returns what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))

ENGINES = {"ddp": {}, "ref": {"master_weights": "fp32"}, "zero2": {"deepspeed": "examples/deepspeed/zero2.json"},
           "zero3": {"deepspeed": "examples/deepspeed/zero3.json"},
           "zero3_offload": {"deepspeed": "examples/deepspeed/zero3_offload.json"}, "fsdp": {"fsdp": "full_shard"}}
# the same engines with bf16 master weights, gradients and AdamW states (master_weights: bf16): 8 instead of
# 16 bytes per trained parameter, so full fine-tuning of 4B fits one card and of 8B fits 2 x 80 GB
ENGINES.update({f"{k}_bf16": {**ENGINES[k], "master_weights": "bf16"} for k in ("zero2", "zero3", "fsdp")})
COMMON = {"bf16": True, "gradient_checkpointing": True, "report_to": "none", "save_strategy": "'no'", "seed": 0,
          "logging_steps": 1, "resume": False, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
          "max_pixels": 401408, "min_pixels": 12544, "video_max_pixels": 16 * 256 * 1024, "video_max_frames": 16,
          "model_max_length": 4096, "too_long": "skip", "dataset_use": "workload",
          "compile_layers": False}  # every engine eager (compile_layers auto would compile DDP rows only)
FULL = {"tune_mm_vision": True, "tune_mm_mlp": True, "tune_mm_llm": True, "vision_tower_lr": 2e-6,
        "mm_projector_lr": 1e-5}
LORA = {"lora_enable": True, "lora_r": 64, "lora_alpha": 128, "tune_mm_llm": False, "learning_rate": 1e-4}


def setup(sizes: list[str], work: Path, samples: int) -> None:
    import torch
    from workload import make_workload

    from qvl.models.build import build_random, build_tiny

    for size in sizes:
        out = work / f"m{size}"
        if (out / "config.json").is_file():
            continue
        t0 = time.time()
        if size.startswith("tiny"):  # tiny, tiny-moe: CPU smoke runs
            build_tiny(out, variant="moe" if size == "tiny-moe" else "default")
        else:
            build_random(size, out, dtype=torch.bfloat16)
        print(f"built {size} in {time.time() - t0:.0f} s", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    wl = work / "wl"
    if not (wl / "workload.jsonl").is_file():
        make_workload(wl, n=samples, seed=0)
        (wl / "datasets.yaml").write_text("workload:\n  annotation_path: workload.jsonl\n  data_path: .\n")


def mixed_micro_batches(work: Path, world: int, batch: int, steps: int, acc: int) -> dict:
    """From qvl's sampler: micro-batches where one rank has no image/video while another has some."""
    from qvl.data.registry import load_mixture, load_registry
    from qvl.train.config import build_config
    from qvl.train.batches import Plan
    from qvl.train.loop import Dist

    records = load_mixture("workload", load_registry(work / "wl" / "datasets.yaml"), seed=0)
    cfg = build_config({"model_name_or_path": "m", "dataset_use": "workload", "tune_mm_llm": True, "seed": 0,
                        "per_device_train_batch_size": batch, "gradient_accumulation_steps": acc, "max_steps": steps})
    plans = [Plan(len(records), cfg, Dist(r, world, r)) for r in range(world)]
    orders = [p.epoch_order(0) for p in plans]
    media = [bool(r.raw.get("image") or r.raw.get("video")) for r in records]
    n_micro = steps * acc
    mixed = 0
    for j in range(n_micro):
        has = [any(media[i] for i in p.micro_batch(0, j, o)) for p, o in zip(plans, orders)]
        mixed += len(set(has)) > 1
    return {"micro_batches": n_micro, "mixed": mixed}


def run_train(name: str, work: Path, model: str, engine: str, gpus: int, extra: dict, timeout: int,
              gpu_ids: str | None = None) -> subprocess.Popen:
    keys = {**COMMON, **ENGINES[engine], **extra, "model_name_or_path": str(work / f"m{model}"),
            "dataset_registry": str(work / "wl" / "datasets.yaml"), "output_dir": str(work / "runs" / name)}
    if gpus > 1:
        keys["nproc"] = gpus
    args = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in keys.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if gpu_ids is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu_ids
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 -- closed by finish()
    cmd = [sys.executable, "-m", "qvl.train", *args]
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    p.qvl = {"name": name, "log": log, "t0": time.time(), "out": work / "runs" / name, "timeout": timeout,
             "cmd": "python -m qvl.train " + " ".join(args)}
    return p


def finish(p: subprocess.Popen, warmup: int = 3) -> dict:
    import signal

    timed_out = False
    try:
        rc = p.wait(timeout=max(1.0, p.qvl["timeout"] - (time.time() - p.qvl["t0"])))
    except subprocess.TimeoutExpired:  # a hang: kill torchrun and its workers (their own process group)
        os.killpg(p.pid, signal.SIGKILL)
        rc, timed_out = p.wait(), True
    p.qvl["log"].close()
    out, name = p.qvl["out"], p.qvl["name"]
    rows = []
    if (out / "metrics.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    res = {"rc": rc, "timed_out": timed_out, "seconds": round(time.time() - p.qvl["t0"], 1),
           "steps": len(rows), "losses": [r["loss"] for r in rows], "command": p.qvl["cmd"],
           "bench_command": "python3 " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d")}
    if rows:
        res["peak_mem_gib"] = max(r.get("peak_mem_gib", 0.0) for r in rows)
        k = warmup if len(rows) > warmup else 1  # steady state: after the first k steps
        first, last = rows[k - 1], rows[-1]
        tokens = last["tokens"] - first["tokens"]
        dt = last["elapsed_s"] - first["elapsed_s"]
        res["tokens_per_s"] = round(tokens / dt, 1) if dt > 0 else round(last["tokens_per_s"] or 0.0, 1)
        res["step_s"] = round(dt / max(1, len(rows) - k), 3)
    log = (out.parent.parent / f"{name}.log").read_text(errors="replace").splitlines()
    keep = [line for line in log if line.startswith(("step", "done", "model", "memory", "error", "fix", "note",
                                                     "DeepSpeed", "launching"))]
    res["log_tail"] = (keep[-6:] if rc == 0 else keep[-4:] + log[-25:])
    print(f"{name}: rc={rc} {res.get('tokens_per_s', '-')} tok/s peak {res.get('peak_mem_gib', '-')} GiB "
          f"in {res['seconds']} s", flush=True)
    return res


def run_pairs(jobs: list[tuple], work: Path, results: dict, save, two_gpus: bool) -> None:
    """jobs: (name, model, engine, gpus, extra, timeout). 1-GPU jobs two at a time (GPU 0 and 1)."""
    singles = [j for j in jobs if j[3] == 1]
    for i in range(0, len(singles), 2 if two_gpus else 1):
        procs = [run_train(j[0], work, j[1], j[2], 1, j[4], j[5], gpu_ids=str(k)) for k, j in enumerate(singles[i:i + 2])]
        for p in procs:
            results[p.qvl["name"]] = finish(p)
            save()
    for j in jobs:
        if j[3] > 1:
            results[j[0]] = finish(run_train(j[0], work, *j[1:]))
            save()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="parity")
    ap.add_argument("--model", default=None, help="override every case's model (tiny for a CPU smoke run)")
    ap.add_argument("--steps", type=int, default=None, help="override steps")
    ap.add_argument("--engines", default="zero2,zero3,fsdp", help="parity engines")
    ap.add_argument("--parity-ref", choices=("own", "ddp", "reuse"), default="own",
                    help="1-GPU reference: each engine's own 1-GPU run, one plain run (fp32 master weights), or "
                         "the plain run already in --out (same code path for unpacked batches)")
    ap.add_argument("--lora-engines", default="ddp,zero2", help="scaling: engines of the LoRA-8B runs")
    ap.add_argument("--full-engines", default="ddp,zero2_bf16,fsdp_bf16", help="scaling: engines of the full-4B runs")
    ap.add_argument("--full8b-engines", default="zero3_bf16,zero3_offload", help="full8b: engines")
    ap.add_argument("--moe-engines", default="zero2,zero3,fsdp", help="moe: engines of the 2-GPU runs")
    ap.add_argument("--work", default="/tmp/qvl_multigpu")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--timeout", type=int, default=240, help="seconds per run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "multigpu.json"))
    args = ap.parse_args(argv)
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    gpus = torch.cuda.device_count()
    results["card"] = torch.cuda.get_device_name(0) if gpus else "cpu"
    results["gpus"] = gpus
    results["date"] = time.strftime("%Y-%m-%d")
    import transformers

    results.setdefault("versions", {}).update(torch=torch.__version__, transformers=transformers.__version__)
    try:
        import deepspeed

        results["versions"]["deepspeed"] = deepspeed.__version__
    except ImportError:
        results["versions"]["deepspeed"] = None
    runs = results.setdefault("runs", {})

    def save():
        summarise(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))

    sizes = {"parity": ["2B"], "scaling": (["4B"] if args.full_engines else []) + (["8B"] if args.lora_engines else []),
             "full8b": ["8B"], "moe": ["30B-A3B"]}
    setup(sorted({args.model or s for c in cases for s in sizes[c]}), work, args.samples)
    two = gpus >= 2 or not gpus
    if "parity" in cases:
        steps = args.steps or 30
        model = args.model or "2B"
        extra = {**FULL, "per_device_train_batch_size": 1, "max_steps": steps}
        jobs = []
        if args.parity_ref == "ddp":  # one plain 1-GPU run (fp32 master weights, as the engines keep) for all
            jobs.append(("parity-ref-1gpu", model, "ref", 1, {**extra, "gradient_accumulation_steps": 4},
                         args.timeout))
        for eng in args.engines.split(","):
            if args.parity_ref == "reuse":
                ref = runs.get("parity-ref-1gpu") or {}
                same = f"m{model} " in ref.get("command", "") + " " and f"max_steps={steps} " in ref.get("command", "")
                if not same:
                    raise SystemExit(f"--parity-ref reuse: no parity-ref-1gpu run of m{model} with max_steps={steps} "
                                     "in --out")
            for n in (1, 2) if args.parity_ref == "own" else (2,):
                jobs.append((f"parity-{eng}-{n}gpu", model, eng, n, {**extra, "gradient_accumulation_steps": 4 // n},
                             args.timeout))
        results["mixed_micro_batches_2gpu"] = mixed_micro_batches(work, 2, 1, steps, 2)
        run_pairs(jobs, work, runs, save, two)
    if "scaling" in cases:
        steps = args.steps or 10
        jobs = []
        for label, model, kind, engines, bs in (("lora8b", "8B", LORA, [e for e in args.lora_engines.split(",") if e], 4),
                                                ("full4b", "4B", FULL, [e for e in args.full_engines.split(",") if e], 4)):
            for eng in engines:
                for n in (1, 2):
                    extra = {**kind, "data_flatten": True, "per_device_train_batch_size": bs,
                             "gradient_accumulation_steps": 2 // n, "max_steps": steps}
                    jobs.append((f"scaling-{label}-{eng}-{n}gpu", args.model or model, eng, n, extra, args.timeout))
        run_pairs(jobs, work, runs, save, two)
    if "full8b" in cases:
        steps = args.steps or 6
        for eng in args.full8b_engines.split(","):
            extra = {**FULL, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": steps,
                     "data_flatten": True}
            runs[f"full8b-{eng}-2gpu"] = finish(run_train(f"full8b-{eng}-2gpu", work, args.model or "8B", eng, 2,
                                                          extra, args.timeout), warmup=2)
            save()
    if "moe" in cases:
        steps = args.steps or 6
        model = args.model or "30B-A3B"
        extra = {**LORA, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "data_flatten": True,
                 "per_device_train_batch_size": 2, "max_steps": steps}
        jobs = [("moe-lora-1gpu", model, "ddp", 1, {**extra, "gradient_accumulation_steps": 2}, args.timeout)]
        jobs += [(f"moe-lora-{eng}-2gpu", model, eng, 2, {**extra, "gradient_accumulation_steps": 1}, args.timeout)
                 for eng in args.moe_engines.split(",") if eng]
        run_pairs(jobs, work, runs, save, two)
    save()
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


def summarise(results: dict) -> None:
    """parity: max |loss(1 GPU) - loss(2 GPUs)| per engine; no_hang; scaling: speedup 1 -> 2 GPUs."""
    runs = results.get("runs", {})
    parity, scaling, hang_runs = {}, {}, []
    for name, r in runs.items():
        if name.startswith("parity-") and name.endswith("-2gpu"):
            one = runs.get("parity-ref-1gpu") or runs.get(name.replace("-2gpu", "-1gpu"))
            hang_runs.append(r)
            if one and r["losses"] and one["losses"]:
                n = min(len(r["losses"]), len(one["losses"]))
                d = [abs(a - b) for a, b in zip(r["losses"][:n], one["losses"][:n])]
                parity[name[len("parity-"):-len("-2gpu")]] = {
                    "max_abs_loss_diff": max(d), "max_rel_loss_diff": max(x / abs(b) for x, b in zip(d, one["losses"])),
                    "steps_compared": n, "first_loss": one["losses"][0], "last_loss_1gpu": one["losses"][n - 1],
                    "last_loss_2gpu": r["losses"][n - 1],
                    "reference": "parity-ref-1gpu" if "parity-ref-1gpu" in runs else name.replace("-2gpu", "-1gpu")}
        if name.startswith("scaling-") and name.endswith("-2gpu"):
            one = runs.get(name.replace("-2gpu", "-1gpu"))
            if one and one.get("tokens_per_s") and r.get("tokens_per_s"):
                scaling[name[len("scaling-"):-len("-2gpu")]] = round(r["tokens_per_s"] / one["tokens_per_s"], 3)
    results["parity"] = parity
    results["parity_tolerance"] = "max |loss(1 GPU) - loss(2 GPUs)| <= 1 % of the loss at every step (bf16)"
    results["parity_ok"] = {k: v["max_rel_loss_diff"] <= 0.01 for k, v in parity.items()}
    if hang_runs:
        results["no_hang"] = all(r["rc"] == 0 and not r["timed_out"] for r in hang_runs)
    results["scaling"] = scaling
    moe = {name[len("moe-lora-"):]: {k: r.get(k) for k in ("rc", "steps", "tokens_per_s", "peak_mem_gib")}
           for name, r in runs.items() if name.startswith("moe-lora-")}
    if moe:
        results["moe_lora"] = moe


if __name__ == "__main__":
    main()
