"""Check `qvl plan` against real peak memory on a GPU (written for an H100; not run in CI).

Builds official Qwen3-VL shapes with random bf16 weights, runs a few serve (transformers generate) and
train (LoRA / full, with and without gradient checkpointing) settings, and prints planner prediction vs
measured peak: both torch.cuda.max_memory_allocated (compare with the plan's peak_allocated_gib) and
max_memory_reserved + CUDA context (compare with total_gib).

    python bench/plan_accuracy.py                 # default set (2B, 4B, 8B)
    python bench/plan_accuracy.py --only 8B --json bench/results/plan_accuracy.json

Each configuration runs in a fresh subprocess so that peaks do not leak between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CONFIGS = [
    # serve: transformers generate, one image (visual tokens = pixels / 1024) + text, batch, new tokens
    dict(mode="serve", size="2B", batch=1, image_pixels=1024 * 1024, text=64, new=64),
    dict(mode="serve", size="8B", batch=1, image_pixels=1024 * 1024, text=64, new=128),
    dict(mode="serve", size="8B", batch=8, image_pixels=448 * 448, text=1800, new=64),
    dict(mode="serve", size="8B", batch=1, video_frames=16, frame_pixels=448 * 448, text=64, new=64),
    # train: LoRA r64 all linear, the h100_baseline.md anchors and variations
    dict(mode="train", size="8B", method="lora", batch=2, seq=2007, image_pixels=448 * 448, ckpt=True),
    dict(mode="train", size="8B", method="lora", batch=4, seq=2007, image_pixels=448 * 448, ckpt=True),
    dict(mode="train", size="4B", method="lora", batch=2, seq=4096, image_pixels=1024 * 1024, ckpt=True),
    dict(mode="train", size="2B", method="lora", batch=2, seq=2048, image_pixels=448 * 448, ckpt=False),
    dict(mode="train", size="2B", method="full", batch=2, seq=2048, image_pixels=448 * 448, ckpt=True),
    dict(mode="train", size="2B", method="full", batch=1, seq=2048, image_pixels=448 * 448, ckpt=False),
]


def _inputs(model, cfg, batch, seq, image_pixels=0, video_frames=0, frame_pixels=0, dev="cuda"):
    """Token ids + pixel_values + grid for `batch` rows of `seq` tokens, with one image or video each."""
    import math

    import torch


    c = model.config
    ids = torch.randint(0, min(1000, c.text_config.vocab_size // 2), (batch, seq), device=dev)
    kw = {}
    if image_pixels:
        side = int(math.sqrt(image_pixels)) // 32 * 32
        gh = gw = side // 16
        n_tok = gh * gw // 4
        ids[:, 1:1 + n_tok] = c.image_token_id
        kw["pixel_values"] = torch.randn(batch * gh * gw, 3 * 2 * 16 * 16, device=dev, dtype=torch.bfloat16)
        kw["image_grid_thw"] = torch.tensor([[1, gh, gw]] * batch, device=dev)
    if video_frames:
        side = int(math.sqrt(frame_pixels)) // 32 * 32
        gh = gw = side // 16
        t = video_frames // 2
        per = gh * gw // 4  # one block per frame pair, separated by a text token (like the timestamps)
        for i in range(t):
            ids[:, 1 + i * (per + 1):1 + i * (per + 1) + per] = c.video_token_id
        kw["pixel_values_videos"] = torch.randn(batch * t * gh * gw, 3 * 2 * 16 * 16, device=dev,
                                                dtype=torch.bfloat16)
        kw["video_grid_thw"] = torch.tensor([[t, gh, gw]] * batch, device=dev)
    mm = torch.zeros_like(ids)
    mm[ids == c.image_token_id] = 1
    mm[ids == getattr(c, "video_token_id", -1)] = 2
    kw["mm_token_type_ids"] = mm
    return ids, kw


def run_one(cfg: dict) -> dict:
    import torch

    from qvl.models.build import random_model
    from qvl.plan import plan_serve, plan_train

    torch.cuda.reset_peak_memory_stats()
    free0, total = torch.cuda.mem_get_info()
    model, _ = random_model(cfg["size"], dtype=torch.bfloat16, device="cuda")
    if cfg["mode"] == "serve":
        seq = cfg["text"] + cfg.get("image_pixels", 0) // 1024 + (cfg.get("video_frames", 0) // 2) * \
            (cfg.get("frame_pixels", 0) // 1024 + 1)
        ids, kw = _inputs(model, cfg, cfg["batch"], seq, cfg.get("image_pixels", 0), cfg.get("video_frames", 0),
                          cfg.get("frame_pixels", 0))
        model.eval()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg["new"],
                           min_new_tokens=cfg["new"], do_sample=False, **kw)
        img_tok = max(cfg.get("image_pixels", 0) // 1024, (cfg.get("video_frames", 0) // 2) *
                      (cfg.get("frame_pixels", 0) // 1024))
        plan = plan_serve(cfg["size"], "h100", backend="transformers", max_model_len=seq + cfg["new"],
                          max_num_seqs=cfg["batch"], image_tokens=img_tok, recommend=False)
    else:
        from peft import LoraConfig, get_peft_model

        if cfg["method"] == "lora":
            for p in model.parameters():
                p.requires_grad_(False)
            lcfg = LoraConfig(r=64, lora_alpha=128, lora_dropout=0.05,
                              target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
            model = get_peft_model(model, lcfg)
        else:
            for n, p in model.named_parameters():
                p.requires_grad_(".visual." not in f".{n}" or "merger" in n)
        if cfg["ckpt"]:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        ids, kw = _inputs(model, cfg, cfg["batch"], cfg["seq"], cfg.get("image_pixels", 0))
        for _ in range(2):  # the second step has optimizer states
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, **kw)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out
        plan = plan_train(cfg["size"], "h100", method=cfg["method"], batch=cfg["batch"], seq_len=cfg["seq"],
                          max_pixels=cfg.get("image_pixels", 451_584), gradient_checkpointing=cfg["ckpt"],
                          lora_r=64, recommend=False)
    torch.cuda.synchronize()
    alloc = torch.cuda.max_memory_allocated() / 2**30
    reserved = torch.cuda.max_memory_reserved() / 2**30
    # device memory in use outside torch's pool at the end (CUDA context, cuBLAS workspaces)
    free1, _ = torch.cuda.mem_get_info()
    used = (total - free1) / 2**30
    context = max(0.0, used - torch.cuda.memory_reserved() / 2**30)
    return dict(config=cfg, predicted_alloc_gib=round(plan.peak_allocated_gib, 2), measured_alloc_gib=round(alloc, 2),
                predicted_total_gib=round(plan.total_gib, 2), measured_total_gib=round(reserved + context, 2),
                rel_error_alloc=round(plan.peak_allocated_gib / alloc - 1, 3),
                rel_error_total=round(plan.total_gib / (reserved + context) - 1, 3),
                # the schema: the whole-GPU prediction vs the measured reserved peak + context
                predicted_gib=round(plan.total_gib, 2), measured_gib=round(reserved + context, 2),
                rel_error=round(plan.total_gib / (reserved + context) - 1, 3),
                device=torch.cuda.get_device_name(), torch=torch.__version__)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="run only configs of this size (e.g. 8B)")
    ap.add_argument("--mode", choices=["serve", "train"], help="run only configs of this mode")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config (JSON) in this process
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(run_one(json.loads(a.one))), flush=True)
        return
    rows = []
    print(f"{'config':70s} {'pred alloc':>10s} {'meas alloc':>10s} {'err':>7s} {'pred total':>10s} "
          f"{'meas total':>10s} {'err':>7s}")
    for cfg in CONFIGS:
        if (a.only and cfg["size"] != a.only) or (a.mode and cfg["mode"] != a.mode):
            continue
        env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg)], capture_output=True, text=True,
                           env=env)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        label = " ".join(f"{k}={v}" for k, v in cfg.items())
        if line is None:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(f"{label:70s} FAILED: {err}")
            rows.append(dict(config=cfg, error=err))
            continue
        row = json.loads(line[7:])
        rows.append(row)
        print(f"{label:70s} {row['predicted_alloc_gib']:10.2f} {row['measured_alloc_gib']:10.2f} "
              f"{row['rel_error_alloc']:+7.1%} {row['predicted_total_gib']:10.2f} {row['measured_total_gib']:10.2f} "
              f"{row['rel_error_total']:+7.1%}", flush=True)
    if a.json:
        os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
        import datetime

        import torch
        import transformers

        out = {"benchmark": "bench/plan_accuracy.py", "card": torch.cuda.get_device_name(0),
               "date": datetime.date.today().isoformat(),
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
               "command": "python " + " ".join(sys.argv), "rows": rows}
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
