"""Activation recomputation in the decoder layers: which layers recompute in backward, and how much of each.

* :func:`checkpoint_some_layers` — recompute only a fraction of the decoder layers (selective activation
  checkpointing, ``gradient_checkpointing_ratio``): memory is traded for speed layer by layer instead of all or
  nothing; :func:`ratio_for_memory` finds the smallest fraction that fits.
* :func:`recompute_scope` — a recomputed layer recomputed whole, or keeping its attention half
  (``gradient_checkpointing_scope``, :func:`recompute_mlp_only`).
* :func:`checkpoint_inside` — the layer's checkpoint moved into its own ``forward``, so a compiled layer recomputes
  through its compiled graph on every transformers version.

Tested on CPU against the plain path (tests/train/test_speed.py).
"""

from __future__ import annotations

import math

import torch

from qvl.errors import QvlError


def decoder_layers(model) -> list:
    from qvl.data.packing import language_model

    return list(language_model(model).layers)


def spread(k: int, n: int) -> list[int]:
    """``k`` of ``range(n)``, evenly spaced."""
    k = max(0, min(k, n))
    return sorted({int((j + 0.5) * n / k) for j in range(k)}) if k else []


def checkpoint_some_layers(model, ratio: float) -> list[int]:
    """Keep gradient checkpointing on ``round(ratio x layers)`` decoder layers (evenly spaced); off on the rest.

    Call after the model's gradient checkpointing is enabled. Recomputation does not change any value,
    only what is kept for backward. Returns the indices of the layers still recomputed.
    """
    if not 0.0 <= ratio <= 1.0:
        raise QvlError(f"gradient_checkpointing_ratio={ratio} must be in [0, 1]", where="gradient_checkpointing_ratio")
    layers = decoder_layers(model)
    keep = set(spread(round(ratio * len(layers)), len(layers)))
    for i, layer in enumerate(layers):
        if not hasattr(layer, "gradient_checkpointing"):
            raise QvlError(f"decoder layer {type(layer).__name__} has no gradient_checkpointing switch",
                           where="gradient_checkpointing_ratio", fix="use gradient_checkpointing_ratio: 1.0")
        layer.gradient_checkpointing = bool(layer.gradient_checkpointing) and i in keep
    return [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]


RECOMPUTE_SCOPES = ("layer", "mlp")


def recompute_scope(model, scope: str, lora_r: int | None = None) -> int:
    """``gradient_checkpointing_scope``: ``layer`` recomputes a checkpointed decoder layer whole (transformers' own
    checkpointing); ``mlp`` keeps its attention half (:func:`recompute_mlp_only`). ``lora_r``: the adapters' rank,
    refused when the policy would take them for projections. Call after :func:`checkpoint_some_layers`. Returns the
    layers made selective."""
    if scope not in RECOMPUTE_SCOPES:
        raise QvlError(f"gradient_checkpointing_scope {scope!r} is not one of {RECOMPUTE_SCOPES}",
                       where="gradient_checkpointing_scope")
    if scope == "layer":
        return 0
    text = model.config.get_text_config()
    if getattr(text, "num_experts", 0):
        raise QvlError("gradient_checkpointing_scope=mlp is for dense models (its policy tells the MLP's matmuls by "
                       "their width; experts have another)", where="gradient_checkpointing_scope",
                       fix="gradient_checkpointing_scope: layer")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    sizes = (text.hidden_size, text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim)
    if lora_r in projection_sizes(*sizes):
        raise QvlError(f"gradient_checkpointing_scope=mlp cannot tell LoRA rank {lora_r} from the attention "
                       f"projections (sizes {sorted(projection_sizes(*sizes))})", where="gradient_checkpointing_scope",
                       fix="gradient_checkpointing_scope: layer, or another lora_r")
    context = recompute_mlp_only(*sizes)
    layers = decoder_layers(model)
    for layer in layers:
        checkpoint_inside(layer, context)
    return sum(layer.qvl_recompute for layer in layers)


def ratio_for_memory(n_layers: int, free_bytes: float, layer_bytes: float) -> float:
    """The smallest checkpointed fraction whose kept activations fit ``free_bytes``.

    ``layer_bytes``: what one decoder layer keeps for backward when it is not recomputed (e.g. the
    planner's ``layer_saved_bytes_per_token`` x the longest row).
    """
    if layer_bytes <= 0:
        return 0.0
    free_layers = max(0, min(n_layers, math.floor(free_bytes / layer_bytes)))
    return (n_layers - free_layers) / n_layers


def projection_sizes(hidden: int, q_dim: int, kv_dim: int) -> set[int]:
    """The sizes :func:`recompute_mlp_only` tells the attention projections by: a LoRA adapter of such a rank would look
    like one (its small matmuls would be kept too)."""
    return {hidden, q_dim, kv_dim}


def recompute_mlp_only(hidden: int, q_dim: int, kv_dim: int):
    """A ``context_fn`` for ``torch.utils.checkpoint``: a recomputed decoder layer keeps its attention half.

    Selective activation checkpointing: the outputs of the attention projections (the matmuls whose (input, output)
    sizes are q's, k's / v's or o's: (hidden, q_dim), (hidden, kv_dim), (q_dim, hidden)) and of the attention kernel
    are saved in the forward pass; the MLP's matmuls, the LoRA adapters' small ones (rank r on one side) and every
    elementwise op are recomputed. The recompute then costs the MLP's projections (about two thirds of a layer's
    forward FLOPs, none of its attention) for :func:`qvl.plan.memory.attention_saved_bytes_per_token` per token.
    """
    from functools import partial

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    matmuls = {aten.mm.default, aten.addmm.default}
    saved = {(hidden, q_dim), (hidden, kv_dim), (q_dim, hidden)}  # (input, output) of q, k / v, o

    def policy(ctx, op, *args, **kwargs):
        name = str(op)
        if ("attn" in name or "attention" in name) and "backward" not in name:
            return CheckpointPolicy.MUST_SAVE
        if op in matmuls and (args[-2].shape[-1], args[-1].shape[-1]) in saved:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return partial(create_selective_checkpoint_contexts, policy)


_CHECKPOINT_INSIDE: dict[type, type] = {}


def _checkpoint_inside_class(base: type) -> type:
    """``base`` with a ``forward`` that recomputes itself (non-reentrant) when the layer's ``qvl_recompute`` is on,
    through the layer's ``qvl_recompute_context`` (selective checkpointing) when it has one."""
    if base not in _CHECKPOINT_INSIDE:
        from torch.utils.checkpoint import checkpoint

        def forward(self, *args, **kwargs):
            if self.qvl_recompute and self.training and torch.is_grad_enabled():
                context = self.qvl_recompute_context
                if context is not None:
                    kwargs["context_fn"] = context
                return checkpoint(base.forward, self, *args, use_reentrant=False, **kwargs)
            return base.forward(self, *args, **kwargs)

        _CHECKPOINT_INSIDE[base] = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__,
                                                                 "qvl_base_class": base})
    return _CHECKPOINT_INSIDE[base]


def checkpoint_inside(layer, context_fn=None) -> None:
    """Move a decoder layer's gradient checkpointing from transformers into the layer's own ``forward``.

    transformers checkpoints a layer around ``__call__`` up to 5.17 and around ``forward`` from 5.2x; compiling the
    module would therefore put the checkpoint outside the compiled code on one version and inside on the other.
    Here it is always inside ``forward`` (the layer's class is swapped for a subclass, the way FSDP2 does; the state
    dict is unchanged), so a compiled layer recomputes through its compiled graph on every version. Whether the
    layer recomputes is what ``gradient_checkpointing`` said (see :func:`checkpoint_some_layers`); ``context_fn``
    makes the recompute selective (:func:`recompute_mlp_only`). Undone by :func:`uncompile` (also before pickling
    the model object: the subclass is made at run time; ``state_dict`` and ``save_pretrained`` are unaffected).
    """
    layer.qvl_recompute_context = context_fn
    if hasattr(type(layer), "qvl_base_class"):
        return
    layer.qvl_recompute = bool(getattr(layer, "gradient_checkpointing", False))
    layer.gradient_checkpointing = False
    layer.__class__ = _checkpoint_inside_class(type(layer))
