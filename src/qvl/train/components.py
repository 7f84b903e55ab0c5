"""What trains: freezing, LoRA, and optimizer parameter groups, by component.

Components of a Qwen3-VL model (parameter names of ``Qwen3VLForConditionalGeneration``):

===========  ==========================================================  ======================
component    parameters                                                  trained by / LR
===========  ==========================================================  ======================
vision       ``model.visual.{patch_embed,pos_embed,blocks}.*``            tune_mm_vision / vision_tower_lr
deepstack    ``model.visual.deepstack_merger_list.*``                     tune_mm_vision / vision_tower_lr
merger       ``model.visual.merger.*``                                    tune_mm_mlp / mm_projector_lr
llm          ``model.language_model.*`` (embeddings, layers, final norm)  tune_mm_llm / learning_rate
lm_head      ``lm_head.weight`` (the embedding matrix when tied)          tune_mm_llm / learning_rate
===========  ==========================================================  ======================

Rules the official code breaks and this module keeps: ``requires_grad`` is set on parameters
(never on a module attribute), so ``lm_head`` follows ``tune_mm_llm`` whether tied or not; LoRA
honours r/alpha/dropout exactly; LoRA combines with the tune flags (a component with adapters
trains through them, the flags fully train the others via PEFT ``modules_to_save``, so the saved
adapter holds every trained weight); each LR applies on its own.

Under autocast, :func:`lora_inputs_stay_16bit` skips PEFT's cast of each LoRA layer's input to the adapter's fp32
dtype: autocast casts it straight back to bf16 for the matmul, so it made two full-activation copies per adapted
linear, forward, recompute and backward, for bit-identical values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from qvl.errors import QvlError

COMPONENTS = ("vision", "deepstack", "merger", "llm", "lm_head")
FLAG = {"vision": "tune_mm_vision", "deepstack": "tune_mm_vision", "merger": "tune_mm_mlp", "llm": "tune_mm_llm",
        "lm_head": "tune_mm_llm"}

# LoRA target patterns (full match over module names of the unwrapped model).
LORA_PATTERNS = {
    "llm": r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "vision": r"model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))",
    "merger": r"model\.visual\.merger\.linear_fc(1|2)",
}
# MoE experts keep their weights as 3-D parameters (no Linear modules): LoRA reaches them through
# peft's ``target_parameters`` (parameter-name suffixes), one low-rank pair per weight shared layout.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
_PEFT_PREFIX = re.compile(r"^(base_model\.model\.)")
_PEFT_PARTS = re.compile(r"\.(base_layer|modules_to_save\.default|original_module)(?=\.)|\.lora_\w+\.default")


def base_name(name: str) -> str:
    """Parameter name with PEFT's wrapping removed (``base_model.model.``, ``.base_layer``, ``lora_A.default``)."""
    return _PEFT_PARTS.sub("", _PEFT_PREFIX.sub("", name))


def component_of(name: str) -> str:
    n = base_name(name)
    if n.startswith("model.visual.merger."):
        return "merger"
    if n.startswith("model.visual.deepstack_merger_list."):
        return "deepstack"
    if n.startswith("model.visual."):
        return "vision"
    if n.startswith("lm_head."):
        return "lm_head"
    if n.startswith("model.language_model."):
        return "llm"
    raise QvlError(f"parameter {name!r} belongs to no known Qwen3-VL component",
                   fix="qvl supports Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration")


def is_lora(name: str) -> bool:
    return ".lora_" in name


def lora_regex(cfg) -> str:
    if cfg.lora_target_regex:
        return cfg.lora_target_regex
    return "(" + "|".join(f"(?:{LORA_PATTERNS[c]})" for c in cfg.lora_targets) + ")"


def _modules_to_save(model, cfg) -> list[str]:
    """Module-name suffixes PEFT should fully train next to LoRA (components trained by a flag, not by LoRA)."""
    lora = set(cfg.lora_components)
    out = []
    if cfg.tune_mm_vision and "vision" not in lora:
        visual = model.model.visual
        out += ["visual.patch_embed", "visual.pos_embed"]
        out += [f"visual.blocks.{i}" for i in range(len(visual.blocks))]
    if cfg.tune_mm_vision:  # DeepStack mergers have no LoRA target: the flag trains them fully
        out += [f"visual.deepstack_merger_list.{i}" for i in range(len(model.model.visual.deepstack_merger_list))]
    if cfg.tune_mm_mlp and "merger" not in lora:
        out.append("visual.merger")
    return out


def expert_targets(model, cfg) -> list[str]:
    """peft ``target_parameters`` for the MoE experts when LoRA trains the LLM (empty for dense models)."""
    if not (cfg.lora_experts and "llm" in cfg.lora_components):
        return []
    names = {n for n, _ in model.named_parameters()}
    return [t for t in EXPERT_PARAMETERS if any(n.endswith(t) for n in names)]


def apply_training_mode(model, cfg):
    """Freeze / unfreeze / wrap ``model`` as ``cfg`` asks. Returns the model to train (maybe a PeftModel)."""
    model.config.use_cache = False
    if getattr(model.config, "text_config", None) is not None:
        model.config.text_config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora_enable:
        from peft import LoraConfig, get_peft_model

        regex = lora_regex(cfg)
        names = [n for n, m in model.named_modules() if re.fullmatch(regex, n)]
        if not names:
            raise QvlError(f"LoRA target pattern matches no module: {regex}", where="lora_target_regex"
                           if cfg.lora_target_regex else "lora_targets")
        experts = expert_targets(model, cfg)
        if experts and cfg.lora_dropout:
            raise QvlError(f"LoRA on MoE experts does not support dropout (lora_dropout={cfg.lora_dropout:g})",
                           where="lora_dropout", fix="lora_dropout: 0, or lora_experts: false to leave the experts "
                           "frozen (LoRA then reaches attention only)")
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=regex, bias="none", modules_to_save=_modules_to_save(model, cfg) or None,
                          **({"target_parameters": experts} if experts else {}))
        model = get_peft_model(model, lcfg)
        if lcfg.lora_dropout != cfg.lora_dropout or lcfg.r != cfg.lora_r:  # never silently change them
            raise QvlError("peft changed the LoRA settings", where="lora_dropout")
        return model
    for name, p in model.named_parameters():
        p.requires_grad_(bool(getattr(cfg, FLAG[component_of(name)])))
    # lm_head: set on the weight (tied: it *is* the embedding matrix, which follows tune_mm_llm too)
    model.lm_head.weight.requires_grad_(bool(cfg.tune_mm_llm))
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations; non-reentrant (works with LoRA and frozen embeddings)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5.24 (the old name warns there)
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers 5.17
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    if any(not p.requires_grad for p in base.model.language_model.embed_tokens.parameters()):
        base.enable_input_require_grads()


def lora_inputs_stay_16bit(model) -> int:
    """Turn off PEFT's cast of LoRA inputs to the adapter dtype; returns the layers changed.

    Only for training under autocast: there every matmul runs in the autocast dtype whatever its inputs,
    so the fp32 copy changes no value (bf16 -> fp32 is exact, and autocast rounds it back), it only costs
    memory traffic and kernel launches.
    """
    n = 0
    for m in model.modules():
        if getattr(m, "cast_input_dtype_enabled", None) is True and hasattr(m, "lora_A"):
            m.cast_input_dtype_enabled = False
            n += 1
    return n


def _unique_params(model):
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        yield name, p


@dataclass
class Group:
    component: str
    lr: float
    decay: bool
    names: list[str]
    params: list[torch.nn.Parameter]


def no_decay(name: str, p) -> bool:
    return p.ndim < 2 or name.endswith(".bias") or "norm" in base_name(name).rsplit(".", 2)[-2]


def param_groups(model, cfg) -> list[Group]:
    """Trainable parameters split by (component, decay), each with its LR. Tied weights appear once."""
    groups: dict[tuple[str, bool], Group] = {}
    for name, p in _unique_params(model):
        if not p.requires_grad:
            continue
        comp = component_of(name)
        decay = cfg.weight_decay > 0 and not no_decay(name, p)
        g = groups.setdefault((comp, decay), Group(comp, cfg.lr_for(comp), decay, [], []))
        g.names.append(name)
        g.params.append(p)
    if not groups:
        raise QvlError("no parameter would train", where="tune_mm_llm",
                       fix="set tune_mm_llm / tune_mm_mlp / tune_mm_vision or lora_enable")
    return [groups[k] for k in sorted(groups, key=lambda k: (COMPONENTS.index(k[0]), k[1]))]


def optimizer_groups(groups: list[Group], weight_decay: float) -> list[dict]:
    return [{"params": g.params, "lr": g.lr, "initial_lr": g.lr, "weight_decay": weight_decay if g.decay else 0.0,
             "name": f"{g.component}{'' if g.decay else '/no_decay'}"} for g in groups]


def component_table(model, cfg) -> list[dict]:
    """Rows: component, trainable params, frozen params, LR (or '-') and how it trains."""
    from qvl.train.quantize import is_quantized, logical_numel

    rows = {c: {"component": c, "trainable": 0, "frozen": 0, "how": ""} for c in COMPONENTS}
    lora_hit, quantized = set(), set()
    for name, p in _unique_params(model):
        comp = component_of(name)
        if ".original_module." in name:
            continue  # PEFT's frozen copy of a module it trains fully (modules_to_save)
        if p.requires_grad:
            rows[comp]["trainable"] += p.numel()
            if is_lora(name):
                lora_hit.add(comp)
        else:
            rows[comp]["frozen"] += logical_numel(p)  # a 4-bit weight packs two codes per stored byte
            if is_quantized(p):
                quantized.add(comp)
    out = []
    for c in COMPONENTS:
        r = rows[c]
        if r["trainable"] + r["frozen"] == 0:
            continue
        if r["trainable"]:
            r["how"] = "LoRA" if c in lora_hit else "full"
            r["lr"] = cfg.lr_for(c)
        else:
            r["how"], r["lr"] = "frozen", None
        if c in quantized:  # quantization: the frozen base weights of this part are stored quantised
            r["how"] += f"+{getattr(cfg, 'quantization', None) or 'quantised'}"
        out.append(r)
    return out


def render_table(rows: list[dict]) -> str:
    width = max(7, *(len(r["how"]) for r in rows)) if rows else 7  # "frozen+nf4" on quantised parts
    head = f"{'component':<11} {'how':<{width}} {'trainable':>13} {'frozen':>13} {'lr':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lr = f"{r['lr']:.2e}" if r["lr"] is not None else "-"
        lines.append(f"{r['component']:<11} {r['how']:<{width}} {r['trainable']:>13,} {r['frozen']:>13,} {lr:>9}")
    t = sum(r["trainable"] for r in rows)
    f = sum(r["frozen"] for r in rows)
    lines.append(f"{'total':<11} {'':<{width}} {t:>13,} {f:>13,}   ({100 * t / max(t + f, 1):.2f} % trainable)")
    return "\n".join(lines)
