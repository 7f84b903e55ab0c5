"""Training throughput, side by side, on the same samples in the same order (run on an H100).

    python bench/train_throughput.py --model 8B --steps 30
    python bench/train_throughput.py --model tiny --device cpu --steps 2 --samples 16   # smoke test

Contestants (LoRA r=64, alpha=128 on the LLM's q/k/v/o unless said otherwise, AdamW, bf16 weights):
  baseline      plain transformers + peft: batches of 4 padded to the longest, sdpa, gradient
                checkpointing, the model's own loss (what TRL / LLaMA-Factory without packing do)
  flatten       the official data_flatten semantics: the 4 samples concatenated into one row with
                per-sample mRoPE; sdpa with a block-diagonal mask (flash-attn is not installable here)
  qvl           qvl's training step: packed rows, block-sparse flex attention, logits only at label
                positions; with and without gradient checkpointing; then qvl's default LoRA targets
                (all LLM linear layers)
Every contestant sees the same 4 samples per optimizer step, so losses are comparable step by step.
Useful tokens are non-padding tokens. MFU counts 4 x LLM non-embedding params per token (LoRA:
forward + input gradients, no recompute) plus causal attention, over 790 TFLOP/s (H100 dense bf16).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from workload import histogram, make_workload  # noqa: E402

from qvl.config.vision import VisionBudget  # noqa: E402
from qvl.data.collate import collate  # noqa: E402
from qvl.data.packing import pack, rope_index_fn, use_packed_attention  # noqa: E402
from qvl.data.preprocess import IGNORE_INDEX, encode  # noqa: E402
from qvl.data.samples import parse_sample  # noqa: E402

PEAK_TFLOPS = 790.0
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = QKVO + ["gate_proj", "up_proj", "down_proj"]


def build(model_name: str, device: str):
    if model_name == "tiny":
        from qvl.models.build import tiny_parts

        model, processor = tiny_parts()
        return model.to(device), processor
    from qvl.models.build import random_model

    return random_model(model_name, dtype=torch.bfloat16, device=device)


def llm_flops_per_token(model, lengths: list[int]) -> float:
    tc = model.config.text_config
    n = sum(p.numel() for name, p in model.named_parameters()
            if "language_model" in name and "embed_tokens" not in name and "lora_" not in name)
    q_dim = tc.num_attention_heads * tc.head_dim
    # causal attention per sequence: QK^T and PV, forward 2*2*L^2*q_dim/2, backward 2x forward
    attn = sum(3 * 2 * L * L * q_dim * tc.num_hidden_layers for L in lengths)
    return 4 * n + attn / max(1, sum(lengths))


def add_lora(model, targets, r=64, alpha=128):
    from peft import LoraConfig, get_peft_model

    regex = r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(" + "|".join(targets) + ")"
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=regex))


def set_checkpointing(model, on: bool):
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    else:
        model.gradient_checkpointing_disable()


def step_padded(model, group, pad_id, device):
    batch = {k: v.to(device) for k, v in collate(group, pad_id).items()}
    return model(**batch, use_cache=False).loss


def step_flatten(model, group, pad_id, device):
    batch = pack(group, rope_index_fn(model))
    batch.pop("seq_lens")
    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    return model(**batch).loss


def make_step_qvl(model):
    from qvl.train.loop import LossModule

    loss_module = LossModule(model)

    def step(model_, group, pad_id, device):
        batch = pack(group, rope_index_fn(model_))
        batch.pop("seq_lens")
        batch.pop("use_cache")
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        n_labels = float(sum((e.labels[1:] != IGNORE_INDEX).sum() for e in group))
        loss, _ = loss_module(batch, n_labels)
        return loss

    return step


def run(name, model, groups, step_fn, pad_id, device, warmup, flops_per_token, attn=None):
    if attn:
        use_packed_attention(model, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    model.train()
    losses, times, tokens, samples = [], [], 0, 0
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i, group in enumerate(groups):
        t0 = time.perf_counter()
        loss = step_fn(model, group, pad_id, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= warmup:
            times.append(dt)
            tokens += sum(len(e) for e in group)
            samples += len(group)
        print(f"  {name} step {i}: loss {losses[-1]:.4f} {dt * 1000:.0f} ms", flush=True)
    total = sum(times)
    res = {
        "tokens_per_s": tokens / total if total else 0.0,
        "samples_per_s": samples / total if total else 0.0,
        "step_s": total / max(1, len(times)),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else None,
        "losses": losses,
        "final_loss_mean5": sum(losses[-5:]) / len(losses[-5:]),
    }
    res["mfu"] = res["tokens_per_s"] * flops_per_token / (PEAK_TFLOPS * 1e12)
    del opt
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8B", help="2B, 4B, 8B (random weights) or tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per contestant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--only", default="", help="comma list of contestants to run")
    ap.add_argument("--packed-attn", default=None, help="attention for qvl rows: flex (GPU default) or sdpa")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_throughput.json"))
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    t0 = time.time()
    model, processor = build(args.model, args.device)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params, built in "
          f"{time.time() - t0:.1f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="qvl_workload_"))
    rows = make_workload(tmp, n=args.samples, seed=0)
    budget = VisionBudget(min_pixels=64 * 1024, max_pixels=1400 * 1024, video_fps=2.0, video_min_frames=4,
                          video_max_frames=16, video_min_pixels=4096, video_max_pixels=16 * 256 * 1024)
    t0 = time.time()
    encs = [encode(parse_sample(r, i, tmp)[0], processor, budget) for i, r in enumerate(rows)]
    lengths = [len(e) for e in encs]
    print(f"encoded {len(encs)} samples in {time.time() - t0:.1f} s; tokens min {min(lengths)} mean "
          f"{sum(lengths) / len(lengths):.0f} max {max(lengths)}", flush=True)
    hist = histogram(lengths)
    for label, count in hist:
        print(f"  {label:>10}: {count}")
    n_steps = args.warmup + args.steps
    groups = [encs[i * args.batch:(i + 1) * args.batch] for i in range(n_steps)]
    groups = [g for g in groups if len(g) == args.batch]
    used = [len(e) for g in groups for e in g]
    pad_id = processor.tokenizer.pad_token_id
    padded_slots = sum(max(len(e) for e in g) * len(g) for g in groups[args.warmup:])
    padding = 1 - sum(len(e) for g in groups[args.warmup:] for e in g) / max(1, padded_slots)

    flex = args.packed_attn or ("flex" if args.device.startswith("cuda") else "sdpa")  # flex backward is GPU-only
    contestants = [
        ("baseline", QKVO, True, step_padded, None),
        ("flatten", QKVO, True, step_flatten, "sdpa"),
        ("qvl", QKVO, True, "qvl", flex),
        ("qvl-no-ckpt", QKVO, False, "qvl", flex),
        ("qvl-all-linear", ALL_LINEAR, False, "qvl", flex),
    ]
    only = set(filter(None, args.only.split(",")))
    results = {}
    base = model
    for name, targets, ckpt, step_fn, attn in contestants:
        if only and name not in only:
            continue
        torch.manual_seed(0)
        peft_model = add_lora(base, targets)
        set_checkpointing(peft_model, ckpt)
        fn = make_step_qvl(peft_model) if step_fn == "qvl" else step_fn
        flops = llm_flops_per_token(peft_model, used)
        try:
            results[name] = run(name, peft_model, groups, fn, pad_id, args.device, args.warmup, flops, attn)
        except torch.OutOfMemoryError as e:
            results[name] = {"error": f"OOM: {str(e).splitlines()[0]}"}
        results[name].update(targets=targets, gradient_checkpointing=ckpt, attention=attn or "sdpa (padded)")
        base = peft_model.unload()
        set_checkpointing(base, False)
        use_packed_attention(base, "sdpa")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()

    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    import transformers

    summary = {
        "card": card, "model": args.model, "torch": torch.__version__, "transformers": transformers.__version__,
        "samples_in_workload": len(encs), "steps": args.steps, "warmup": args.warmup, "batch": args.batch,
        "length_histogram": hist, "padding_fraction_baseline": padding, "contestants": results,
    }
    if "baseline" in results and "qvl" in results and "tokens_per_s" in results["qvl"]:
        summary["baseline"] = {k: results["baseline"].get(k) for k in ("tokens_per_s", "peak_gib")}
        best = max((r for n, r in results.items() if n.startswith("qvl") and "tokens_per_s" in r and n != "qvl-all-linear"),
                   key=lambda r: r["tokens_per_s"])
        summary["qvl"] = {k: best.get(k) for k in ("tokens_per_s", "peak_gib")}
        summary["speedup"] = best["tokens_per_s"] / results["baseline"]["tokens_per_s"]
    print(f"\ncard {card}, model {args.model}, {args.steps} steps x {args.batch} samples after {args.warmup} warm-up; "
          f"baseline padding {padding:.1%}")
    print(f"{'contestant':<16}{'tok/s':>9}{'samples/s':>11}{'step s':>8}{'peak GiB':>10}{'reserved':>10}{'MFU':>7}"
          f"{'loss(last5)':>13}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<16} {r['error']}")
            continue
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        res = f"{r['peak_reserved_gib']:.1f}" if r["peak_reserved_gib"] is not None else "-"
        print(f"{name:<16}{r['tokens_per_s']:>9.0f}{r['samples_per_s']:>11.2f}{r['step_s']:>8.3f}{peak:>10}{res:>10}"
              f"{r['mfu']:>7.1%}{r['final_loss_mean5']:>13.4f}")
    if "speedup" in summary:
        print(f"speedup (best qvl with the baseline's targets vs baseline): {summary['speedup']:.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
