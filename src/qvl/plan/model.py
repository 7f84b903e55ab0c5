"""The model shape the planner needs, from a known size ('8B', a hub id) or a config.json (file or folder).

Known sizes come straight from ``qvl.models.sizes`` (no numbers are restated here). For a config the
parameter counts are measured by instantiating the architecture on the meta device, the same way the
counts in ``sizes.py`` were measured.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qvl.errors import QvlError


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (MoE: unused for activations, see moe_*)
    vocab: int
    tied: bool
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_heads: int
    patch_size: int
    spatial_merge: int
    temporal_patch: int
    deepstack: int  # number of DeepStack mergers
    params_total: int
    params_vision: int
    params_embed: int
    moe_experts: int = 0
    moe_topk: int = 0
    moe_intermediate: int = 0
    kv_bytes_per_token_bf16: int = 0

    @property
    def is_moe(self) -> bool:
        return self.moe_experts > 0

    @property
    def params_lm_head(self) -> int:
        return 0 if self.tied else self.params_embed

    @property
    def params_llm(self) -> int:
        """Everything that is not the vision tower: body + embeddings + lm_head."""
        return self.params_total - self.params_vision

    @property
    def params_llm_body(self) -> int:
        return self.params_total - self.params_vision - self.params_embed - self.params_lm_head

    @property
    def params_merger(self) -> int:
        """The patch merger plus the DeepStack mergers (part of params_vision): 4·vh → 4·vh → hidden MLPs."""
        m = self.vision_hidden * self.spatial_merge**2
        main = m * m + m + m * self.hidden + self.hidden + 2 * self.vision_hidden  # LayerNorm before the shuffle
        return main + self.deepstack_merger_params

    @property
    def deepstack_merger_params(self) -> int:
        """The DeepStack mergers alone (they normalise after the shuffle)."""
        m = self.vision_hidden * self.spatial_merge**2
        return self.deepstack * (m * m + m + m * self.hidden + self.hidden + 2 * m)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def pixels_per_visual_token(self) -> int:
        """Pixels behind one LLM visual token: (patch · merge)², i.e. 32·32 for Qwen3-VL."""
        return (self.patch_size * self.spatial_merge) ** 2

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V for every layer: 2 × layers × kv_heads × head_dim × dtype bytes."""
        if self.kv_bytes_per_token_bf16 and dtype_bytes == 2:
            return self.kv_bytes_per_token_bf16
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def from_size(size) -> ModelShape:
    """A ModelShape from a ``qvl.models.sizes.SizeFacts``."""
    text, vision = size.text_config(), size.vision_config()
    moe = size.moe
    return ModelShape(
        name=size.name,
        layers=size.text_layers,
        hidden=size.text_hidden,
        heads=size.text_heads,
        kv_heads=size.text_kv_heads,
        head_dim=text["head_dim"],
        intermediate=size.text_intermediate,
        vocab=text["vocab_size"],
        tied=size.tie_word_embeddings,
        vision_depth=size.vision_depth,
        vision_hidden=size.vision_hidden,
        vision_intermediate=size.vision_intermediate,
        vision_heads=vision["num_heads"],
        patch_size=vision["patch_size"],
        spatial_merge=vision["spatial_merge_size"],
        temporal_patch=vision["temporal_patch_size"],
        deepstack=len(size.deepstack_indexes),
        params_total=size.params_total,
        params_vision=size.params_vision,
        params_embed=size.params_embed,
        moe_experts=moe.num_experts if moe else 0,
        moe_topk=moe.experts_per_token if moe else 0,
        moe_intermediate=moe.moe_intermediate_size if moe else 0,
        kv_bytes_per_token_bf16=size.kv_bytes_per_token(2),
    )


def _experts(text_config: dict) -> int:
    """A MoE text config's expert count: ``num_experts`` in the official config.json, ``num_local_experts`` as
    newer transformers save it (a 30B-A3B checkpoint saved so was planned as dense: 64 GiB "fits" an H100 where
    its experts' LoRA needs 102, and the first step ran out of memory; H100, 2026-12-06)."""
    return int(text_config.get("num_experts") or text_config.get("num_local_experts") or 0)


def _count_params_meta(cfg: dict) -> tuple[int, int, int]:
    """(total, vision, embed) parameters of a config, instantiated on the meta device (tied counted once)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    moe = cfg.get("model_type") == "qwen3_vl_moe" or _experts(cfg.get("text_config", {})) > 0
    if moe:
        from transformers import Qwen3VLMoeConfig as C
        from transformers import Qwen3VLMoeForConditionalGeneration as M
    else:
        C, M = Qwen3VLConfig, Qwen3VLForConditionalGeneration
    clean = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "transformers_version")}
    config = C(**clean)
    with torch.device("meta"):
        model = M(config)
    seen, total, vision, embed = set(), 0, 0, 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".visual." in f".{name}":
            vision += p.numel()
        elif name.endswith("embed_tokens.weight"):
            embed += p.numel()
    return total, vision, embed


def from_config(path: str | Path) -> ModelShape:
    """A ModelShape from a checkpoint folder or its config.json (no weights are read)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise QvlError(f"no config.json at {p}", fix="pass a Qwen3-VL checkpoint folder, its config.json, "
                       "or a size name such as 8B")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise QvlError(f"config.json is not valid JSON ({e})", where=str(p)) from None
    t, v = cfg.get("text_config"), cfg.get("vision_config")
    if not isinstance(t, dict) or not isinstance(v, dict):
        raise QvlError("not a Qwen3-VL config (no text_config / vision_config)", where=str(p),
                       fix="pass a Qwen3-VL checkpoint or a size name such as 8B")
    try:
        total, vision, embed = _count_params_meta(cfg)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad config for the user
        raise QvlError(f"could not build the architecture from the config ({type(e).__name__}: {e})",
                       where=str(p)) from None
    heads = t["num_attention_heads"]
    hidden = t["hidden_size"]
    tied = bool(cfg.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    return ModelShape(
        name=str(path),
        layers=t["num_hidden_layers"],
        hidden=hidden,
        heads=heads,
        kv_heads=t.get("num_key_value_heads", heads),
        head_dim=t.get("head_dim") or hidden // heads,
        intermediate=t.get("intermediate_size", 0),
        vocab=t.get("vocab_size", cfg.get("vocab_size", 0)),
        tied=tied,
        vision_depth=v["depth"],
        vision_hidden=v["hidden_size"],
        vision_intermediate=v["intermediate_size"],
        vision_heads=v.get("num_heads", 16),
        patch_size=v.get("patch_size", 16),
        spatial_merge=v.get("spatial_merge_size", 2),
        temporal_patch=v.get("temporal_patch_size", 2),
        deepstack=len(v.get("deepstack_visual_indexes", [])),
        params_total=total,
        params_vision=vision,
        params_embed=embed,
        moe_experts=_experts(t),
        moe_topk=t.get("num_experts_per_tok", 0),
        moe_intermediate=t.get("moe_intermediate_size", 0),
    )


def resolve_model(model: str | Path) -> ModelShape:
    """'8B', 'Qwen/Qwen3-VL-8B-Instruct', a folder or a config.json → ModelShape."""
    from qvl.models.sizes import SIZES, get_size

    s = str(model)
    p = Path(s)
    if p.exists() or s.endswith(".json"):
        return from_config(p)
    try:
        return from_size(get_size(s))
    except KeyError:
        raise QvlError(f"unknown model {s!r}", fix=f"use a size ({', '.join(SIZES)}), an official hub id such as "
                       "Qwen/Qwen3-VL-8B-Instruct, or the path of a checkpoint folder / config.json") from None


def from_dims(name: str, *, layers: int, hidden: int, heads: int, kv_heads: int, intermediate: int, vocab: int,
              tied: bool = False, head_dim: int | None = None, qkv_bias: bool = False,
              vision: dict | None = None) -> ModelShape:
    """A ModelShape from a decoder's config numbers (any Llama/Qwen2-style model, optionally with a
    Qwen2.5-VL-style vision tower), for checking the vLLM accounting against start-up logs of models other
    than Qwen3-VL. Parameters are counted from the dimensions: attention q/k/v/o (+ q/k/v bias), SwiGLU MLP
    (3·h·I), two RMSNorms per layer, embeddings and (untied) lm_head.

    ``vision`` (Qwen2.5-VL): depth, hidden, intermediate, heads, patch_size, spatial_merge, temporal_patch;
    blocks are qkv + proj + SwiGLU MLP + two RMSNorms, then a patch embedding and a 2-layer merger to ``hidden``.
    """
    hd = head_dim or hidden // heads
    q, kv = heads * hd, kv_heads * hd
    per_layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * intermediate + 2 * hidden
    if qkv_bias:
        per_layer += q + 2 * kv
    embed = vocab * hidden
    total = layers * per_layer + embed * (1 if tied else 2) + hidden
    v = vision or {}
    vision_params = 0
    if v:
        vh, vi, merge = v["hidden"], v["intermediate"], v.get("spatial_merge", 2)
        block = 4 * vh * vh + 4 * vh + 3 * vh * vi + 2 * vi + vh + 2 * vh
        patch = 3 * v.get("temporal_patch", 2) * v.get("patch_size", 14) ** 2 * vh
        mh = vh * merge**2
        merger = vh + mh * mh + mh + mh * hidden + hidden
        vision_params = v["depth"] * block + patch + merger
        total += vision_params
    return ModelShape(
        name=name, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hd,
        intermediate=intermediate, vocab=vocab, tied=tied,
        vision_depth=v.get("depth", 0), vision_hidden=v.get("hidden", 0),
        vision_intermediate=v.get("intermediate", 0), vision_heads=v.get("heads", 0),
        patch_size=v.get("patch_size", 14), spatial_merge=v.get("spatial_merge", 2),
        temporal_patch=v.get("temporal_patch", 2), deepstack=0,
        params_total=total, params_vision=vision_params, params_embed=embed,
    )
