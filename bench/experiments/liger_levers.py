"""Liger's kernels against what qvl runs in their place, one op at a time (run on a GPU, with liger-kernel installed).

    python bench/experiments/liger_levers.py --out liger_levers.json

#7 lists Liger (fused linear + cross-entropy, RMSNorm, RoPE) as a lever. qvl does not use it: the loss head is
qvl's own chunked linear + cross-entropy (``qvl.train.loss_head.linear_cross_entropy``) and the decoder layers are
compiled, so inductor fuses their norms and rotary embedding into the kernels around them. This measures each
op alone on Qwen3-VL-8B's shapes, forward + backward, frozen weights (LoRA: the head and the norms get no gradient;
``--train-head`` gives the head one, as full fine-tuning does):

  loss head   plain (``lm_head`` logits in full, then ``F.cross_entropy`` in fp32), qvl's, Liger's
              ``LigerFusedLinearCrossEntropyLoss``: time, extra peak memory, loss and input-gradient difference to
              an fp32 reference
  RMSNorm     transformers' ``Qwen3VLTextRMSNorm`` eager, the same under ``torch.compile``, ``LigerRMSNorm``
  RoPE        transformers' ``apply_rotary_pos_emb`` for Qwen3-VL's text attention eager, compiled, Liger's

A norm or a rotary embedding compiled alone is an upper bound on what it costs inside a compiled layer, where
inductor also fuses it with its neighbours (the residual add, the q/k norms); Liger's kernels are separate
launches there, so they can at best match the compiled op alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from qvl.models.sizes import RMS_NORM_EPS, VOCAB_SIZE, get_size  # noqa: E402
from qvl.train.loss_head import linear_cross_entropy  # noqa: E402


def timed(fn, reps: int) -> tuple[float, float]:
    """(median ms, extra peak GiB over what was allocated before) of ``fn()`` on the GPU."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - before) / 2**30


def loss_head_rows(rows: int, hidden: int, train_head: bool, reps: int, gemm_multiple: int) -> dict:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(rows)
    weight = (torch.randn(VOCAB_SIZE, hidden, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    weight.requires_grad_(train_head)
    h = torch.randn(rows, hidden, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, VOCAB_SIZE, (rows,), device=dev, generator=g)
    liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")

    def plain():
        return F.cross_entropy((h @ weight.t()).float(), target, reduction="sum")

    heads = {
        "plain": plain,
        "qvl": lambda: linear_cross_entropy(h, weight, target, row_multiple=gemm_multiple),
        "liger": lambda: liger(weight, h, target),
    }
    with torch.no_grad():  # fp32 reference of the loss and the input gradient
        w32, h32 = weight.float(), h.float()
        logits = h32 @ w32.t()
        ref_loss = F.cross_entropy(logits, target, reduction="sum").item()
        probs = logits.softmax(-1)
        probs[torch.arange(rows, device=dev), target] -= 1.0
        ref_grad = probs @ w32
        ref_grad_w = probs.t() @ h32 if train_head else None
        del logits, probs, w32, h32
    out = {}
    for name, fn in heads.items():
        def step():
            h.grad = None
            weight.grad = None
            fn().backward()

        ms, extra = timed(step, reps)
        h.grad = None
        weight.grad = None
        loss = fn()
        loss.backward()
        out[name] = {"ms": ms, "extra_peak_gib": extra, "loss_rel_diff": abs(loss.item() - ref_loss) / abs(ref_loss),
                     "grad_max_abs_diff": (h.grad.float() - ref_grad).abs().max().item()}
        if train_head:
            out[name]["weight_grad_max_abs_diff"] = (weight.grad.float() - ref_grad_w).abs().max().item()
    return out


def norm_rows(rows: int, hidden: int, reps: int) -> dict:
    from liger_kernel.transformers import LigerRMSNorm
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    dev = torch.device("cuda")
    hf = Qwen3VLTextRMSNorm(hidden, eps=RMS_NORM_EPS).to(dev, torch.bfloat16).requires_grad_(False)
    lg = LigerRMSNorm(hidden, eps=RMS_NORM_EPS).to(dev, torch.bfloat16).requires_grad_(False)
    x = torch.randn(rows, hidden, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    ops = {"eager": hf, "compiled": torch.compile(hf, dynamic=False), "liger": lg}
    ref = hf(x).float()  # transformers eager is the reference
    out = {}
    for name, op in ops.items():
        def step():
            x.grad = None
            op(x).backward(dy)

        ms, extra = timed(step, reps)
        out[name] = {"ms": ms, "extra_peak_gib": extra, "max_abs_diff": (op(x).float() - ref).abs().max().item()}
    return out


def rope_rows(rows: int, heads: int, kv_heads: int, reps: int, head_dim: int = 128) -> dict:
    from liger_kernel.transformers.rope import liger_rotary_pos_emb
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    dev = torch.device("cuda")
    q = torch.randn(1, heads, rows, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, kv_heads, rows, head_dim, device=dev, dtype=torch.bfloat16, requires_grad=True)
    angle = torch.rand(1, rows, head_dim // 2, device=dev) * 100
    angle = torch.cat([angle, angle], -1)
    cos, sin = angle.cos().to(torch.bfloat16), angle.sin().to(torch.bfloat16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    ops = {"eager": apply_rotary_pos_emb, "compiled": torch.compile(apply_rotary_pos_emb, dynamic=False),
           "liger": liger_rotary_pos_emb}
    ref_q, _ = apply_rotary_pos_emb(q, k, cos, sin)
    out = {}
    for name, op in ops.items():
        def step():
            q.grad = k.grad = None
            a, b = op(q, k, cos, sin)
            torch.autograd.backward([a, b], [dq, dk])

        ms, extra = timed(step, reps)
        out[name] = {"ms": ms, "extra_peak_gib": extra,
                     "max_abs_diff": (op(q, k, cos, sin)[0].float() - ref_q.float()).abs().max().item()}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8B")
    ap.add_argument("--label-rows", default="512,2048,8192", help="loss head: label tokens in one step")
    ap.add_argument("--rows", default="4096,16384", help="norm and RoPE: tokens in one packed row")
    ap.add_argument("--train-head", action="store_true", help="the head's weight gets a gradient (full fine-tuning)")
    ap.add_argument("--gemm-multiple", type=int, default=128, help="qvl's gemm_row_multiple (auto: 128 on a GPU)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import liger_kernel
    import transformers

    size = get_size(args.model)
    result = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
              "liger_kernel": getattr(liger_kernel, "__version__", "?"), "model": args.model,
              "train_head": args.train_head, "loss_head": {}, "rms_norm": {}, "rope": {}}
    print(f"{result['card']}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"liger-kernel {result['liger_kernel']}, {args.model} shapes", flush=True)
    for n in map(int, args.label_rows.split(",")):
        result["loss_head"][n] = r = loss_head_rows(n, size.text_hidden, args.train_head, args.reps,
                                                    args.gemm_multiple)
        for name, v in r.items():
            print(f"loss head {n:>6} rows  {name:<9}{v['ms']:>9.2f} ms {v['extra_peak_gib']:>7.2f} GiB  "
                  f"loss rel diff {v['loss_rel_diff']:.1e}  grad max diff {v['grad_max_abs_diff']:.1e}"
                  + (f"  weight grad max diff {v['weight_grad_max_abs_diff']:.1e}" if args.train_head else ""),
                  flush=True)
    for n in map(int, args.rows.split(",")):
        result["rms_norm"][n] = r = norm_rows(n, size.text_hidden, args.reps)
        for name, v in r.items():
            print(f"rms norm  {n:>6} rows  {name:<9}{v['ms']:>9.3f} ms  max diff {v['max_abs_diff']:.1e}", flush=True)
        result["rope"][n] = r = rope_rows(n, size.text_heads, size.text_kv_heads, args.reps)
        for name, v in r.items():
            print(f"rope      {n:>6} rows  {name:<9}{v['ms']:>9.3f} ms  max diff {v['max_abs_diff']:.1e}", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(out)


if __name__ == "__main__":
    main()
