"""What one compiled LLM decoder layer keeps for backward, per token, and what its forward + backward take, under
each recompute setting (run on a GPU; `--device cpu --model tiny` is a smoke test).

    python bench/experiments/layer_memory.py --model 8B --json layer_memory.json

One decoder layer at the model's real widths (random bf16 weights), LoRA r=64 alpha=128 on q/k/v/o with fp32
adapters under bf16 autocast (as `qvl train` runs them), whole-layer `torch.compile` (inductor), per-sample attention
over a row of 4 samples (one flash varlen call on a GPU). Settings:

  keep            nothing recomputed, the compiler's default partition
  keep-budget-B   nothing checkpointed, the compiler's partitioner under activation_memory_budget=B
  mlp             checkpointed, the MLP recomputed (gradient_checkpointing_scope: mlp)
  layer           checkpointed whole (only the layer's input kept)

Kept bytes per token are the slope of (memory held after the forward - the output) between two row lengths, so a
per-layer constant (bf16 copies of the adapters) is left out. The time is forward + backward at the longer row.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src"))


def make_layer(cfg, device, setting: str):
    from peft import LoraConfig, get_peft_model
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer

    from qvl.train import components, recompute

    class Stack(torch.nn.Module):  # decoder_layers() finds .layers through language_model()
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([Qwen3VLTextDecoderLayer(cfg, 0)])

    torch.manual_seed(0)
    stack = Stack().to(device=device, dtype=torch.bfloat16)
    for p in stack.parameters():
        p.requires_grad_(False)
    model = get_peft_model(stack, LoraConfig(r=64, lora_alpha=128, lora_dropout=0.0,
                                             target_modules=r".*\.(q_proj|k_proj|v_proj|o_proj)"))
    components.lora_inputs_stay_16bit(model)
    layer = model.base_model.model.layers[0]
    layer.gradient_checkpointing = setting in ("mlp", "layer")
    context = None
    if setting == "mlp":
        heads, kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        context = recompute.recompute_mlp_only(cfg.hidden_size, heads * hd, kv * hd)
    recompute.checkpoint_inside(layer, context)
    layer.compile(backend="inductor", dynamic=True)
    return layer


def inputs(cfg, rotary, tokens: int, device):
    from qvl.data.packing import sample_bounds_inputs

    lengths = [tokens // 4] * 3 + [tokens - 3 * (tokens // 4)]
    text = torch.cat([torch.arange(n) for n in lengths]).to(device)
    position_ids = torch.stack([text, text, text, text])[:, None]  # (4, 1, L): text positions, then t / h / w
    h = torch.randn(1, tokens, cfg.hidden_size, device=device, dtype=torch.bfloat16, requires_grad=True)
    cos_sin = rotary(h, position_ids[1:])
    kw = sample_bounds_inputs(position_ids)
    return h, cos_sin, position_ids, kw


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def measure(layer, cfg, rotary, tokens: int, device, repeat: int):
    h, cos_sin, position_ids, kw = inputs(cfg, rotary, tokens, device)
    grad = torch.randn_like(h)

    def fwd():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = layer(h, position_embeddings=cos_sin, attention_mask=None, position_ids=position_ids[0], **kw)
        return out[0] if isinstance(out, tuple) else out

    for _ in range(2):  # compile and warm up
        fwd().backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    before = allocated(device)
    out = fwd()
    kept = allocated(device) - before - out.untyped_storage().nbytes()
    out.backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fwd().backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return kept, (time.perf_counter() - t0) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="8B")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", default="2048,4096", help="two row lengths (the slope gives bytes per token)")
    ap.add_argument("--budgets", default="0.95,0.9,0.85,0.8,0.7,0.5")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import torch._dynamo
    import torch._functorch.config as functorch_config
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from qvl.data.packing import register_per_sample_attention
    from qvl.models.build import official_config, tiny_parts

    device = torch.device(args.device)
    cfg = (tiny_parts()[0].config if args.model == "tiny" else official_config(args.model)).get_text_config()
    cfg._attn_implementation = register_per_sample_attention()
    rotary = Qwen3VLTextRotaryEmbedding(cfg).to(device)
    short, long = (int(x) for x in args.tokens.split(","))
    settings = [("keep", None)] + [(f"keep-budget-{b}", float(b)) for b in args.budgets.split(",")]
    settings += [("mlp", None), ("layer", None)]
    rows = []
    print(f"{args.model} decoder layer on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}; rows of {short:,} and {long:,} tokens")
    print(f"{'setting':<18}{'kept KB/token':>14}{'fwd+bwd ms':>12}")
    for name, budget in settings:
        torch._dynamo.reset()
        with functorch_config.patch(activation_memory_budget=budget if budget is not None else 1.0):
            layer = make_layer(cfg, device, "keep" if name.startswith("keep") else name)
            k_short, _ = measure(layer, cfg, rotary, short, device, 1)
            k_long, seconds = measure(layer, cfg, rotary, long, device, args.repeat)
        per_token = (k_long - k_short) / (long - short)
        rows.append(dict(setting=name, budget=budget, kept_bytes_per_token=per_token, kept_bytes_long=k_long,
                         fwd_bwd_ms=seconds * 1e3, tokens=long))
        print(f"{name:<18}{per_token / 1024:>14.1f}{seconds * 1e3:>12.2f}", flush=True)
        del layer
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, device=str(device), torch=torch.__version__,
                           card=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
