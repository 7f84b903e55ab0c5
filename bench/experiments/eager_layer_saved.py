"""What one eager decoder layer on `qvl train`'s path keeps for backward per token, counted from the tensors autograd
saves, against the planner's :func:`qvl.plan.memory.layer_saved_bytes_per_token` (what the preflight and
``gradient_checkpointing_ratio: auto`` charge a kept eager layer: MoE models, whose layers are not compiled, and runs
with ``compile_layers: false``).

One decoder layer at the model's real widths (random bf16 weights), LoRA r=64 alpha=128 on q/k/v/o (and, for MoE,
on the experts as `qvl train` puts it there: peft ``target_parameters``, computed by :mod:`qvl.models.moe_experts`),
fp32 adapters under bf16 autocast with their inputs kept bf16 (:func:`qvl.train.components.lora_inputs_stay_16bit`),
per-sample attention over a row of 4 samples. Every storage autograd saves in the forward (parameters and the
layer's input left out) is counted once; kept bytes per token are the slope between two row lengths, so per-layer
constants (bf16 copies of the adapters) drop out. Runs on a CPU: what is saved is decided by the Python code and
autocast, not by the device (the attention kernel's own saved tensors differ: flash keeps q, k, v, its output and a
log-sum-exp, the CPU's per-sample sdpa the same four and no log-sum-exp).

    python bench/experiments/eager_layer_saved.py --sizes 8B,30B-A3B --json bench/experiments/results/eager_layer_saved_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))

ATTENTION = r".*\.(q_proj|k_proj|v_proj|o_proj)"


def make_layer(size: str):
    from peft import LoraConfig, get_peft_model

    from qvl.data.packing import register_per_sample_attention
    from qvl.models import moe_experts
    from qvl.models.build import official_config
    from qvl.models.sizes import get_size
    from qvl.train import components

    moe = get_size(size).is_moe
    if moe:
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import (
            Qwen3VLMoeTextDecoderLayer as Layer, Qwen3VLMoeTextRotaryEmbedding as Rotary)
    else:
        from transformers.models.qwen3_vl.modeling_qwen3_vl import (
            Qwen3VLTextDecoderLayer as Layer, Qwen3VLTextRotaryEmbedding as Rotary)
    cfg = official_config(size).get_text_config()
    cfg._attn_implementation = register_per_sample_attention()

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Layer(cfg, 0)])

    torch.manual_seed(0)
    stack = Stack().to(dtype=torch.bfloat16)
    for p in stack.parameters():
        p.requires_grad_(False)
    experts = {"target_parameters": list(components.EXPERT_PARAMETERS)} if moe else {}
    model = get_peft_model(stack, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0, target_modules=ATTENTION,
                                             **experts))
    components.lora_inputs_stay_16bit(model)
    moe_experts.install(model)
    return model, model.base_model.model.layers[0], Rotary(cfg), cfg


def saved_bytes(model, layer, rotary, cfg, tokens: int) -> int:
    from qvl.data.packing import sample_bounds_inputs

    lengths = [tokens // 4] * 3 + [tokens - 3 * (tokens // 4)]
    text = torch.cat([torch.arange(n) for n in lengths])
    position_ids = torch.stack([text, text, text, text])[:, None]
    h = torch.randn(1, tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = rotary(h, position_ids[1:])
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {h.untyped_storage().data_ptr()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(h, position_embeddings=cos_sin, attention_mask=None, position_ids=position_ids[0],
                    **sample_bounds_inputs(position_ids))
    out = out[0] if isinstance(out, tuple) else out
    out.float().sum().backward()  # the graph ran: what was saved was needed
    return sum(storages.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="8B,30B-A3B")
    ap.add_argument("--tokens", default="512,1024", help="two row lengths (the slope gives bytes per token)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from qvl.models.sizes import get_size
    from qvl.plan.memory import layer_saved_bytes_per_token
    from qvl.plan.model import from_size

    short, long = (int(x) for x in args.tokens.split(","))
    rows = []
    for size in args.sizes.split(","):
        model, layer, rotary, cfg = make_layer(size)
        per_token = (saved_bytes(model, layer, rotary, cfg, long) - saved_bytes(model, layer, rotary, cfg, short)) \
            / (long - short)
        shape = from_size(get_size(size))
        planned = layer_saved_bytes_per_token(shape, 64, ("q", "k", "v", "o"), 0.0, expert_lora=shape.is_moe)
        rows.append(dict(size=size, saved_bytes_per_token=per_token, planned_bytes_per_token=planned,
                         planned_over_saved=planned / per_token))
        print(f"{size}: saved {per_token / 1024:.1f} KiB a token, planned {planned / 1024:.1f} "
              f"({planned / per_token:.2f}x)", flush=True)
        del model, layer
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(probe="bench/experiments/eager_layer_saved.py", device="cpu", torch=torch.__version__,
                           date=datetime.date.today().isoformat(), command="python " + " ".join(sys.argv),
                           lora="r=64 on q/k/v/o (+ the experts for MoE), no dropout", tokens=[short, long],
                           rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
