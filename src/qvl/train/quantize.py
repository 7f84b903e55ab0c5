"""Quantised base weights for LoRA training (QLoRA): the frozen linear layers stored in 4 or 8 bits.

``quantization: nf4`` (LLaMA-Factory's ``quantization_bit: 4``) stores each chosen ``nn.Linear`` as a bitsandbytes
``Linear4bit``: NF4 codes with double quantisation (the per-64-value absmax constants quantised again: 4.127 bits a
weight) and matmuls computed in the run's dtype (bf16 with ``bf16: true``). ``int8`` (``quantization_bit: 8``)
stores them as ``Linear8bitLt`` (LLM.int8: int8 rows, fp16 outliers above 6.0). The layers are the ones LoRA targets
by component (:data:`qvl.train.components.LORA_PATTERNS`): by default the LLM's attention and MLP projections; the
vision tower and merger stay in the load dtype unless ``quantization_targets`` names them; embeddings, lm_head
(the fused loss head reads its matrix), norms, MoE routers and MoE experts' 3-D weights (bitsandbytes quantises
``Linear`` layers only) always do.

Each layer is quantised from the loaded weights as it moves to the device, one at a time: the device never holds
the whole model in 16 bits (the host does, as for every run: the checkpoint is read there first).

A quantised part can only be frozen or trained through LoRA adapters: full fine-tuning of 4-bit weights, DeepSpeed
ZeRO-3 (it shards the packed 4-bit tensors as if they were weights) and FSDP2 are refused with the fix; so is a run
whose bitsandbytes cannot compute on the device (no install, or no CPU backend).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from qvl.errors import QvlError
from qvl.utils.bnb_import import import_bitsandbytes

QUANT_TYPES = ("nf4", "int8")
QUANT_COMPONENTS = ("llm", "vision", "merger")
BIT_ALIASES = {4: "nf4", 8: "int8"}  # LLaMA-Factory's quantization_bit
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold (bitsandbytes' and transformers' default)


@dataclass
class Quantized:
    """What :func:`quantize_model` did: per component, layers and (unpacked) parameters quantised, and their bytes."""
    kind: str
    version: str
    layers: dict[str, int] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    bytes: int = 0

    def line(self, dtype: torch.dtype) -> str:
        """One start-up line: which parts are quantised, how, and what stays in ``dtype``."""
        what = ("NF4 with double quantisation" if self.kind == "nf4" else f"LLM.int8 (outliers > {INT8_THRESHOLD:g} "
                "in 16 bits)")
        parts = ", ".join(f"{c} {self.layers[c]:,} linears ({_count(self.params[c])} weights)" for c in self.layers)
        kept = [c for c in QUANT_COMPONENTS if c not in self.layers] + ["embeddings", "lm_head", "norms"]
        size = f"{self.bytes / 2**30:.2f} GiB" if self.bytes >= 2**30 else f"{self.bytes / 2**20:.2f} MiB"
        name = str(dtype).removeprefix("torch.")
        return (f"quantization={self.kind} (bitsandbytes {self.version}, {what}, {name} compute): {parts or 'no layer'}"
                f" stored in {size}; {', '.join(kept)} stay {name}")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def normalise(value):
    """``quantization`` as given (nf4, int8, 4, 8, none / false / null) -> nf4, int8 or None."""
    if value is None or value is False:
        return None
    if isinstance(value, bool):
        raise ValueError("quantization: true does not say how: use nf4 (4-bit) or int8")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if int(value) not in BIT_ALIASES or value != int(value):
            raise ValueError(f"quantization_bit={value} is not supported: use 4 (nf4) or 8 (int8)")
        return BIT_ALIASES[int(value)]
    text = str(value).strip().lower()
    if text in ("", "none", "null", "no", "false", "bf16", "16"):
        return None
    if text in ("4", "8"):
        return BIT_ALIASES[int(text)]
    if text not in QUANT_TYPES:
        raise ValueError(f"unknown quantization {value!r}: use nf4 (4-bit, QLoRA) or int8")
    return text


def config_problem(cfg) -> tuple[str, str, str] | None:
    """(key, what, fix) when ``cfg`` asks a quantised part to train fully (its weights have no 16-bit copy to update),
    else None. A quantised part may be frozen, or trained through LoRA adapters on it."""
    if not cfg.quantization:
        return None
    flags = {"llm": "tune_mm_llm", "vision": "tune_mm_vision", "merger": "tune_mm_mlp"}
    for part in cfg.quantization_targets:
        if part == "vision" and cfg.tune_mm_vision:  # its DeepStack mergers (quantised with it) have no LoRA target
            return ("tune_mm_vision", "tune_mm_vision=true fully trains the DeepStack mergers, which quantization="
                    f"{cfg.quantization} stores with the vision tower in {4 if cfg.quantization == 'nf4' else 8} "
                    "bits (they cannot be updated)", "tune_mm_vision: false (vision LoRA still trains the tower's "
                    "blocks through lora_targets), or remove vision from quantization_targets")
        if getattr(cfg, flags[part]) and part not in cfg.lora_components:
            return (flags[part], f"{flags[part]}=true fully fine-tunes the {part}, whose weights quantization="
                    f"{cfg.quantization} stores in {4 if cfg.quantization == 'nf4' else 8} bits (they cannot be "
                    "updated)", f"train it through LoRA (lora_enable: true, {part} in lora_targets), or leave it in "
                    f"bf16 (remove {part} from quantization_targets), or quantization: null")
    return None


def engine_problem(cfg, zero_stage: int) -> QvlError | None:
    """A refusal for an engine that cannot hold quantised weights: ZeRO-3 and FSDP2 shard every weight as a flat
    tensor, which the packed 4-bit codes and their constants are not."""
    if not cfg.quantization:
        return None
    if cfg.engine == "deepspeed" and zero_stage >= 3:
        return QvlError(f"DeepSpeed ZeRO-3 cannot shard quantization={cfg.quantization} weights (the packed codes and "
                        "their constants are not plain weight tensors)", where="deepspeed",
                        fix="one GPU or DDP (deepspeed: null; 4-bit 32B fits a 24 GB card), ZeRO-2 "
                            "(examples/deepspeed/zero2.json), or quantization: null for ZeRO-3")
    if cfg.engine == "fsdp":
        return QvlError(f"FSDP2 cannot shard quantization={cfg.quantization} weights", where="fsdp",
                        fix="one GPU or DDP (fsdp: null), or quantization: null for FSDP2")
    return None


def require_bitsandbytes(kind: str, device: torch.device, dtype: torch.dtype):
    """bitsandbytes, checked by one small forward and backward of a ``kind`` layer on ``device``: a missing install,
    or a build without a backend for the device (CPU before 0.45, a CUDA library that does not load), is refused
    here in one line rather than failing inside the first step."""
    bnb = import_bitsandbytes(f"quantization={kind}", "quantization", "quantization: null")
    try:
        layer = _quantized_linear(bnb, kind, torch.nn.Linear(64, 64, bias=False), dtype).to(device)
        x = torch.ones(2, 64, dtype=dtype, device=device, requires_grad=True)
        layer(x).float().sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite input gradient")
    except Exception as e:
        backend = "CPU" if device.type == "cpu" else device.type.upper()
        raise QvlError(f"quantization={kind}: bitsandbytes {getattr(bnb, '__version__', '?')} cannot run a "
                       f"{kind} layer on {backend} ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})",
                       where="quantization", fix=f"pip install -U bitsandbytes (its {backend} backend: >= 0.45), "
                       "train on a GPU, or quantization: null") from None
    return bnb


def _quantized_linear(bnb, kind: str, linear: torch.nn.Linear, dtype: torch.dtype) -> torch.nn.Module:
    """A bitsandbytes layer holding ``linear``'s weights, quantised when it moves to a device (``.to``)."""
    has_bias = linear.bias is not None
    if kind == "nf4":
        new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                compress_statistics=True, quant_type="nf4", device="meta")
        new.weight = bnb.nn.Params4bit(linear.weight.data.to(dtype), requires_grad=False, compress_statistics=True,
                                       quant_type="nf4", module=new)
    else:
        new = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False,
                                  threshold=INT8_THRESHOLD, device="meta")
        new.weight = bnb.nn.Int8Params(linear.weight.data.to(dtype), requires_grad=False, has_fp16_weights=False)
    if has_bias:
        new.bias = torch.nn.Parameter(linear.bias.data.to(dtype), requires_grad=False)
    return new


# beyond LoRA's layers: the DeepStack mergers follow the vision tower (their component trains with tune_mm_vision)
QUANT_EXTRA = {"vision": r"model\.visual\.deepstack_merger_list\.\d+\.linear_fc(1|2)"}


def target_regex(targets) -> str:
    """Full-match regex over module names for the linears of ``targets`` (llm, vision, merger): the layers LoRA
    targets for each component, and with vision the DeepStack mergers' too."""
    from qvl.train.components import LORA_PATTERNS

    patterns = [LORA_PATTERNS[t] for t in targets] + [QUANT_EXTRA[t] for t in targets if t in QUANT_EXTRA]
    return "(" + "|".join(f"(?:{p})" for p in patterns) + ")"


def quantize_model(model, cfg, device: torch.device, dtype: torch.dtype) -> Quantized:
    """Replace ``cfg.quantization_targets``' linear layers of ``model`` (a transformers Qwen3-VL, before LoRA wraps
    it) by bitsandbytes layers quantised on ``device``, one layer at a time; mark the model as peft expects of a
    quantised model (peft then wraps these layers with its bitsandbytes LoRA layers)."""
    from qvl.train.components import component_of

    bnb = require_bitsandbytes(cfg.quantization, device, dtype)
    regex = re.compile(target_regex(cfg.quantization_targets))
    done = Quantized(cfg.quantization, getattr(bnb, "__version__", "?"))
    names = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and regex.fullmatch(n)]
    if not names:
        raise QvlError(f"quantization={cfg.quantization}: no linear layer of {cfg.quantization_targets} found",
                       where="quantization_targets", fix="qvl quantises Qwen3-VL's decoder, vision and merger linears")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        layer = _quantized_linear(bnb, cfg.quantization, linear, dtype).to(device)
        setattr(parent, child, layer)
        del linear  # the 16-bit weights go as soon as the layer is quantised
        part = component_of(name + ".weight")
        done.layers[part] = done.layers.get(part, 0) + 1
        done.params[part] = done.params.get(part, 0) + layer.in_features * layer.out_features
        done.bytes += sum(t.numel() * t.element_size() for t in stored_tensors(layer))
    model.is_loaded_in_4bit = cfg.quantization == "nf4"  # what peft reads to dispatch its bitsandbytes LoRA layers
    model.is_loaded_in_8bit = cfg.quantization == "int8"
    return done


def stored_tensors(layer) -> list[torch.Tensor]:
    """The tensors a quantised layer keeps: codes, bias, and its quantisation constants (NF4: absmax, itself
    quantised, with its own constants; int8: the row scales)."""
    w = layer.weight
    out = [w.data] + ([layer.bias.data] if layer.bias is not None else [])
    qs = getattr(w, "quant_state", None)
    if qs is not None:
        out += [t for t in (qs.absmax, getattr(qs, "code", None)) if isinstance(t, torch.Tensor)]
        nested = getattr(qs, "state2", None)
        if nested is not None:
            out += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    scb = getattr(w, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def logical_numel(p: torch.Tensor) -> int:
    """A parameter's weight count before packing (a Params4bit holds two NF4 codes per byte)."""
    qs = getattr(p, "quant_state", None)
    if qs is not None and getattr(qs, "shape", None) is not None:
        return int(torch.Size(qs.shape).numel())
    return p.numel()


def is_quantized(p: torch.Tensor) -> bool:
    return getattr(p, "quant_state", None) is not None or type(p).__name__ in ("Params4bit", "Int8Params")


def fast_path_note(cfg, compiling: bool) -> tuple[object, str]:
    """(cuda_graphs choice, start-up line) for a quantised run: ``compile_layers`` keeps its meaning (dynamo traces
    bitsandbytes' matmuls as whole graphs, checked on CPU; under ``auto`` a layer that fails to compile runs eagerly);
    ``cuda_graphs: auto`` is off, its replay of bitsandbytes' kernels not measured yet (``true`` forces it)."""
    if not cfg.quantization:
        return cfg.cuda_graphs, ""
    graphs = False if cfg.cuda_graphs == "auto" else cfg.cuda_graphs
    compiled = ("compile_layers on: the quantised matmuls compile with their layers (compile_layers=false: eager)"
                if compiling else "compile_layers off")
    replay = ("cuda_graphs auto: off (replaying bitsandbytes' kernels is not measured yet; cuda_graphs=true forces it)"
              if cfg.cuda_graphs == "auto" else f"cuda_graphs={cfg.cuda_graphs}")
    return graphs, f"quantization={cfg.quantization} fast path: {compiled}; {replay}"
