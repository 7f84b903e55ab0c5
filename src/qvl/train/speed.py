"""Speed levers for `qvl train` (issue 7). Each one is switchable by a config key and tested on CPU against
the plain path (tests/train/test_speed.py); measured effects are in docs/benchmarks.md.

* :func:`linear_cross_entropy` — lm_head + cross-entropy in row chunks, gradients computed in the forward
  pass: the full ``tokens x vocabulary`` logits tensor (and its fp32 copy and gradient) never exists.
* :func:`checkpoint_some_layers` — recompute only a fraction of the decoder layers (selective activation
  checkpointing): memory is traded for speed layer by layer instead of all or nothing.
* :func:`compile_layers` — ``torch.compile`` of each decoder layer's parts (regional compilation: one
  graph shared by every layer, dynamic sequence length, so varying row lengths do not recompile).
* :func:`lora_inputs_stay_16bit` — PEFT casts each LoRA layer's input to the adapter's fp32 dtype, and
  autocast casts it straight back to bf16 for the matmul: two full-activation copies per adapted linear,
  forward, recompute and backward, for bit-identical values. Under autocast they are skipped.
* :func:`adamw_options` — the fused AdamW kernel on CUDA (same update, one kernel for all parameters).
* :func:`rows_by_budget` — a step's samples regrouped into packed rows of up to N tokens (the loss is
  token-weighted over the whole step, so how samples are split into rows does not change it).
* :func:`host_floats` — a step's scalars copied to the host in one synchronisation; :func:`queue_host_read` /
  :func:`host_read` — the same copy queued at the end of its step, read later without waiting for later steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qvl.errors import QvlError

from qvl.plan.memory import CE_CHUNK_BYTES  # rows x vocabulary logits per chunk (compute dtype + fp32); the planner counts it


# --------------------------------------------------------------------------------------------------
# Fused linear + cross-entropy
# --------------------------------------------------------------------------------------------------

def add_product_fp32(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``total += a @ b`` for 16-bit ``a``, ``b`` into an fp32 ``total``. On a GPU the matmul adds into ``total``
    itself (cuBLAS with an fp32 output): a full fine-tuning head's weight gradient (vocabulary x hidden, 2.5 GB in
    fp32 at 8B) is then read and written once per chunk, instead of a 16-bit product written, copied to fp32 and
    added (about twice the memory traffic and two more kernels; bench/experiments/liger_levers.py --train-head)."""
    if total.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and hasattr(torch.ops.aten.addmm, "dtype_out"):
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:
        total += (a @ b).float()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T, target_i); gradients made chunk by chunk in forward, scaled in backward."""

    @staticmethod
    def forward(ctx, hidden, weight, target, chunk: int, row_multiple: int = 0):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s:s + chunk], target[s:s + chunk]
                n = h.shape[0]
                if row_multiple > 1 and n % row_multiple:  # zero rows: the matmuls' shapes repeat across steps
                    h = F.pad(h, (0, 0, 0, row_multiple - n % row_multiple))
                logits = (h @ weight.t()).float()  # rounded to the compute dtype first, as lm_head(h).float() is
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse[:n] - logits[:n].gather(1, t[:, None]).squeeze(1)).sum()
                if not (need_h or need_w):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                probs[n:] = 0.0  # padding rows: no gradient
                probs[torch.arange(n, device=t.device), t] -= 1.0
                g = probs.to(h.dtype)
                if need_h:
                    grad_h[s:s + n] = (g @ weight)[:n]
                if need_w:
                    add_product_fp32(grad_w, g.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def gemm_rows(n: int, multiple: int) -> int:
    """``n`` rows rounded up to one of a few sizes (``gemm_row_multiple``): every multiple of ``multiple`` up to
    15 of them, then 8 sizes per doubling (so at most 1/8 more rows). Why a ladder, not every multiple: a step's
    patch count ranges over thousands, so a plain multiple still meets a new matmul shape almost every step, and the
    first time cuBLAS meets a shape it holds the host until the GPU is idle (``bench/experiments/kernel_loading.py``)."""
    if multiple <= 1:
        return n
    k = -(-n // multiple)
    step = 1 << max(0, k.bit_length() - 4)
    return -(-k // step) * step * multiple


def gemm_multiple_for(choice, device: torch.device, engine: str = "ddp") -> int:
    """``gemm_row_multiple`` resolved: ``auto`` is 128 on a GPU under one process or DDP (8B LoRA on an H100: +1.9 %
    tokens/s, 2026-11-28, the levers in bench/results/train_throughput.json; the warm-up takes the tower's compilation the first steps took), else
    0; a number is itself."""
    if choice != "auto":
        return int(choice)
    return 128 if device.type == "cuda" and engine == "ddp" else 0


def gemm_ladder(most: int, multiple: int) -> list[int]:
    """Every size :func:`gemm_rows` gives for 1 to ``most`` rows, ascending."""
    sizes, n = [], 1
    while multiple > 1 and n <= most:
        sizes.append(gemm_rows(n, multiple))
        n = sizes[-1] + 1
    return sizes


def loss_chunk_rows(vocab: int, element_size: int, row_multiple: int = 0, chunk: int | None = None) -> tuple[int, int]:
    """(rows per chunk, row multiple) of :func:`linear_cross_entropy`'s chunks for a ``vocab``-row head computed in
    ``element_size``-byte floats: as many rows as ``CE_CHUNK_BYTES`` of logits hold (unless ``chunk``); with
    ``row_multiple`` a multiple of it (at most one chunk)."""
    if chunk is None:
        chunk = max(16, CE_CHUNK_BYTES // (vocab * (4 + element_size)))
    if row_multiple > 1:  # within the chunk's memory (the planner counts CE_CHUNK_BYTES): at most one chunk's rows
        row_multiple = min(row_multiple, chunk)
        chunk = chunk // row_multiple * row_multiple
    return chunk, row_multiple


def warm_loss_head(weight: torch.Tensor, row_multiple: int, most_rows: int) -> int:
    """Run :func:`linear_cross_entropy` (gradient included) once at each chunk shape it can meet with
    ``row_multiple`` for up to ``most_rows`` label rows (under the caller's autocast), so that training meets none
    for the first time. Returns how many shapes."""
    device_type = weight.device.type
    size = (torch.get_autocast_dtype(device_type).itemsize if torch.is_autocast_enabled(device_type)
            else weight.element_size())
    chunk, multiple = loss_chunk_rows(weight.shape[0], size, row_multiple)
    if multiple <= 1:
        return 0
    sizes = range(multiple, min(chunk, -(-most_rows // multiple) * multiple) + 1, multiple)
    for n in sizes:
        hidden = torch.zeros(n, weight.shape[1], dtype=weight.dtype, device=weight.device, requires_grad=True)
        linear_cross_entropy(hidden, weight.detach(), torch.zeros(n, dtype=torch.long, device=weight.device),
                             row_multiple=row_multiple)
    return len(sizes)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         chunk: int | None = None, row_multiple: int = 0) -> torch.Tensor:
    """Sum over rows of the cross-entropy of ``hidden @ weight.T`` against ``target`` (fp32 result).

    Computes what ``F.cross_entropy(lm_head(hidden).float(), target, reduction="sum")`` computes, under
    autocast too (inputs are cast to the autocast dtype like ``lm_head`` would), without keeping the
    logits: peak extra memory is one chunk of rows.

    ``row_multiple`` (``gemm_row_multiple``): chunks are a multiple of it and the last one is padded with zero rows
    to one, so the matmuls meet few shapes however many label rows a step has (a shape cuBLAS has not met holds
    the host until the GPU is idle). The padding rows add nothing to the loss or the gradients.
    """
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    chunk, row_multiple = loss_chunk_rows(weight.shape[0], weight.element_size(), row_multiple, chunk)
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum() * 0.0).float() * 0.0
    return _LinearCrossEntropy.apply(hidden, weight, target, int(chunk), int(row_multiple))


# --------------------------------------------------------------------------------------------------
# Model structure: the LLM's decoder layers
# --------------------------------------------------------------------------------------------------

def decoder_layers(model) -> list:
    from qvl.data.packing import language_model

    return list(language_model(model).layers)


# --------------------------------------------------------------------------------------------------
# Selective activation checkpointing
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Regional compilation
# --------------------------------------------------------------------------------------------------

COMPILED_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
# without the attention module (per-sample attention reads sample bounds on the host mid-module): its norms
ATTENTION_NORMS = ("q_norm", "k_norm")
COMPILE_SCOPES = ("layer", "parts")


def compile_layers(model, backend: str = "inductor", dynamic: bool = True, attention: bool = True,
                   eager_fallback: bool = False, scope: str = "parts") -> int:
    """``torch.compile`` the decoder layers in place. Returns the modules compiled.

    ``scope="layer"``: each whole decoder layer (norms, attention, LoRA adapters, MLP and the residual adds in one
    graph, forward and backward), with its gradient checkpointing moved inside the compiled code
    (:func:`checkpoint_inside`), the same on every transformers version: the compiler then plans the recompute.
    ``scope="parts"``: each layer's norms, attention and MLP apart, gradient checkpointing staying outside.
    The layers share their code, so one graph serves all of them; ``dynamic=True`` makes the sequence length
    symbolic, so rows of any length reuse it. ``attention=False`` (parts only) leaves the attention module eager
    and compiles its q/k norms instead.
    ``eager_fallback``: a part dynamo cannot trace, or whose forward graph the backend cannot build, runs eagerly
    (with a warning) instead of stopping the run (dynamo's ``suppress_errors``, set for the whole process:
    :func:`qvl.train.loop.train` restores it when it returns). The backward graph is built lazily in the first
    backward pass and is not covered.
    """
    if scope not in COMPILE_SCOPES:
        raise QvlError(f"compile scope {scope!r} is not one of {COMPILE_SCOPES}", where="compile_scope")
    if eager_fallback:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True
    n = 0
    for layer in decoder_layers(model):
        if scope == "layer":
            checkpoint_inside(layer, getattr(layer, "qvl_recompute_context", None))
            parts = [layer]
        else:
            parts = [getattr(layer, name, None) for name in COMPILED_PARTS if attention or name != "self_attn"]
            if not attention:
                parts += [getattr(layer.self_attn, name, None) for name in ATTENTION_NORMS]
        for part in parts:
            if part is not None:
                part.compile(backend=backend, dynamic=dynamic)
                n += 1
    return n


def compile_vision_blocks(model, backend: str = "inductor") -> int:
    """``torch.compile`` each block of a frozen vision tower in place (dynamic patch counts); returns the blocks
    compiled, 0 when any vision weight trains (not measured: the tower then recomputes under checkpointing).

    The tower runs eagerly otherwise: ~27 blocks of small ops launched one by one from the host in every step, on a
    step that waits on the host (8B LoRA on an H100: +14 % tok/s with the blocks compiled, the same losses;
    docs/benchmarks.md). Undone by :func:`uncompile`."""
    blocks = [m for m in model.modules() if type(m).__name__.endswith("VisionBlock")]
    if not blocks or any(p.requires_grad for b in blocks for p in b.parameters()):
        return 0
    for block in blocks:
        block.compile(backend=backend, dynamic=True)
    return len(blocks)


def compile_vision_tower(model, backend: str = "inductor") -> bool:
    """Compile a frozen vision tower's whole forward as one graph (dynamic patch and segment counts), for callers
    that give it its ``grid_thw``-derived inputs precomputed (:mod:`qvl.train.row_forward`, which calls
    ``visual.qvl_compiled_forward``): one guard check and one launch sequence per call instead of one per block
    (27 for Qwen3-VL), on a step that waits on the host (8B LoRA on an H100: the tower's forward took ~60 ms of host
    time per call with its blocks compiled apart, for ~15 ms of kernels; docs/benchmarks.md). transformers'
    output-capturing decorator is left out (``__wrapped__``: dynamo cannot trace its ContextVar); what it adds
    (``output_hidden_states`` / ``output_attentions``) training does not ask for. The patch embedding runs as a matmul
    and the rotary cos / sin are stored once (:mod:`qvl.models.tower_speed`). False (nothing compiled) when any
    vision weight trains, or the forward is not a decorated one. Undone by :func:`uncompile`."""
    visual = next((m for m in model.modules() if type(m).__name__.endswith("VisionModel")), None)
    if visual is None or any(p.requires_grad for p in visual.parameters()):
        return False
    core = getattr(type(visual).forward, "__wrapped__", None)
    if core is None:
        return False
    from qvl.models import tower_speed

    tower_speed.linear_patch_embed(visual)
    tower_speed.stored_rotary(visual)
    visual.qvl_compiled_forward = torch.compile(core, backend=backend, dynamic=True)
    return True


_CHECKPOINT_INSIDE: dict[type, type] = {}
RECOMPUTE_SCOPES = ("layer", "mlp")
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


def embeddings_to_host(model) -> torch.Tensor:
    """``host_embeddings``: move the frozen input-embedding table to host memory and return it (the rows are looked
    up there by :func:`host_embed`; :func:`embeddings_to_device` puts the table back). Raises ValueError when the
    table trains or is the LM head's too (tied: the head needs it on the device every step)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    if emb.weight.requires_grad:
        raise ValueError("the input embeddings train")
    if head is not None and head.weight.data_ptr() == emb.weight.data_ptr():
        raise ValueError("the input embeddings are tied to the LM head (tie_word_embeddings)")
    emb.weight.data = emb.weight.data.to("cpu")
    return emb.weight.data


def embeddings_to_device(model, device) -> None:
    emb = model.get_input_embeddings()
    emb.weight.data = emb.weight.data.to(device)


def host_embed(table: torch.Tensor, ids: torch.Tensor, pin: bool) -> torch.Tensor:
    """``table[ids]`` (ids on the host), gathered straight into pinned memory when ``pin`` (the copy to the GPU
    then neither blocks the host nor pins again)."""
    out = torch.empty((*ids.shape, table.shape[1]), dtype=table.dtype, pin_memory=pin)
    torch.index_select(table, 0, ids.reshape(-1), out=out.view(-1, table.shape[1]))
    return out


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


def uncompile(model) -> None:
    """Undo :func:`compile_layers` (benchmarks reuse one model for several runs)."""
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
        if m.__dict__.pop("qvl_compiled_forward", None) is not None:
            from qvl.models import tower_speed

            tower_speed.restore(m)
        base = getattr(type(m), "qvl_base_class", None)
        if base is not None:
            m.__class__ = base
            m.gradient_checkpointing = m.__dict__.pop("qvl_recompute")
            m.__dict__.pop("qvl_recompute_context", None)


def compile_wanted(choice, device: torch.device) -> bool:
    """``compile_layers`` config value -> on/off: ``auto`` is on for CUDA, off on CPU (slow to build there)."""
    if choice == "auto":
        return device.type == "cuda"
    return bool(choice)


def compile_choice(choice, device: torch.device, engine: str, per_sample: bool, moe: bool,
                   varlen: bool = True) -> tuple[bool, str]:
    """(compile?, why) for the loop. ``auto`` compiles where it was measured faster with equal losses: a GPU, one
    process or DDP, a dense model, packed rows with per_sample attention on the flash varlen kernel (``varlen``:
    torch >= 2.10 and bf16; without it the compiled attention would build an L x L mask per layer) (8B LoRA on an
    H100: +10 % and +45 % in two calls, 2-3 GiB less memory; docs/benchmarks.md). ``true`` compiles any
    single-GPU / DDP run. ``why`` is empty when there is nothing worth saying (off by choice, or auto on CPU)."""
    if not compile_wanted(choice, device):
        return False, ""
    if engine != "ddp":  # sharding wrappers around compiled regions are not measured or tested: keep them apart
        return False, f"not under {engine} (tested with one GPU and DDP only)"
    if choice != "auto":
        return True, "on"
    if moe:
        return False, "auto: mixture-of-experts layers are not measured compiled (compile_layers=true forces it)"
    if not per_sample:
        return False, ("auto: measured only on packed rows with per_sample attention (data_flatten=true); "
                       "compile_layers=true forces it")
    if not varlen:
        return False, ("auto: per_sample attention runs without the flash varlen kernel here (it needs torch >= 2.10 "
                       "and bf16): compiled, it would build an L x L mask per layer")
    return True, "auto"


GRAPHS_AUTO_MIN_GIB = 40  # cuda_graphs auto: cards with at least this much memory (the graphs' pool: ~+10 GiB at 8B)


def cuda_graphs_choice(choice, device: torch.device, world_size: int, per_sample: bool, varlen: bool,
                       compiled: bool = True, lora: bool = True, upstream_trains: bool = False,
                       total_gib: float | None = None) -> tuple[bool, str]:
    """(CUDA graphs?, why) for the loop: the LLM's decoder stack replayed as CUDA graphs (:mod:`qvl.train.graphs`).

    A replay launches a whole forward or backward of the stack at once: the GPU no longer waits for the host between
    kernels (8B LoRA on an H100: busy 77 % -> 96 % of a step, +11 % tokens/s with every row shape recorded ahead;
    docs/benchmarks.md). Built and tested for one process, packed rows with per_sample attention on the flash varlen
    kernel (``varlen``: torch >= 2.10 and bf16; its sample bounds are device tensors, no host read). ``auto`` turns
    it on where it was measured: compiled layers, LoRA with nothing before the decoder training, a card of at least
    ``GRAPHS_AUTO_MIN_GIB`` (the graphs' memory pool adds to the reserved memory); ``true`` wherever it can run."""
    if not choice:
        return False, ""
    structural = ("no CUDA device" if device.type != "cuda" else
                  "one process only (not tested with DDP's gradient hooks)" if world_size > 1 else
                  "it needs packed rows with per_sample attention (data_flatten=true)" if not per_sample else
                  "it needs the flash varlen kernel (torch >= 2.10, bf16=true)" if not varlen else "")
    if structural:  # auto stays quiet here: most runs of these kinds never asked for graphs
        return False, "" if choice == "auto" else f"cuda_graphs off: {structural}"
    if choice != "auto":
        return True, "on"
    if not compiled:
        return False, "cuda_graphs auto: off without compile_layers (measured with compiled layers); true forces it"
    if not lora or upstream_trains:
        return False, ("cuda_graphs auto: off unless LoRA trains and nothing before the decoder (vision tower, merger, "
                       "embeddings) does (what was measured); true forces it where it can replay")
    if total_gib is not None and total_gib < GRAPHS_AUTO_MIN_GIB:
        return False, (f"cuda_graphs auto: off on a {total_gib:.0f} GiB card (its memory pool needs room; on from "
                       f"{GRAPHS_AUTO_MIN_GIB} GiB); true forces it")
    return True, "auto"


def standing_grads(params) -> int:
    """Give every trainable parameter a zeroed ``.grad`` that stays (zero it, never free it, between steps).

    A CUDA graph's backward (:mod:`qvl.train.graphs`) adds into the ``.grad`` tensors it was recorded with: they must
    stay the same tensors for as long as the recording is replayed."""
    n = 0
    for p in params:
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
            n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Optimizer, rows, host syncs
# --------------------------------------------------------------------------------------------------

def adamw_options(optim: str, device: torch.device) -> dict:
    """Extra ``torch.optim.AdamW`` arguments: the fused kernel on CUDA unless ``adamw_torch_foreach`` is asked."""
    if device.type == "cuda" and optim != "adamw_torch_foreach":
        return {"fused": True}
    return {"foreach": True} if optim == "adamw_torch_foreach" else {}


def rows_by_budget(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of a step's samples grouped into rows of at most ``max_tokens`` tokens (best fit decreasing).

    A sample longer than the budget gets a row of its own (samples are never cut). Rows keep their
    samples in the original order.
    """
    from qvl.data.packing import best_fit_decreasing

    plan = best_fit_decreasing(lengths, max_tokens)
    rows = [sorted(p) for p in plan.packs] + [[i] for i in plan.too_long]
    return sorted(rows, key=lambda r: r[0])


def _floats(values, got) -> list[float | None]:
    """``values`` with each tensor replaced by the next of ``got`` (their read values), in order."""
    got = iter(got)
    return [next(got) if isinstance(v, torch.Tensor) else (None if v is None else float(v)) for v in values]


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    # one device for the stack: DeepSpeed's grad norm can live elsewhere (CPU offload) than the loss
    return torch.stack([t.detach().float().reshape(()).to(tensors[0].device) for t in tensors])


def host_floats(*values) -> list[float | None]:
    """Tensors (or numbers, or None) -> floats, with one device-to-host copy for all the tensors."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    return _floats(values, _stacked(tensors).tolist() if tensors else ())


def queue_host_read(*values) -> tuple:
    """Queue the device-to-host copy of ``values``' tensors behind the work queued so far; :func:`host_read` gives
    their floats (as :func:`host_floats`) later, waiting for that work only.

    Why: a plain read (``.tolist()``) waits for everything queued on the stream before it. The loop reads a step's
    numbers once the next step is queued, so a plain read there waits for the next step as well, and the GPU then
    idles while the host builds the step after it. Copied into pinned memory at the end of its own step, with an
    event after the copy, the read waits for its own step only: the host builds step N+2 while the GPU runs N+1.
    Off CUDA (or with a tensor elsewhere) the values are read plainly when asked."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors or not all(t.is_cuda for t in tensors):
        return None, values, None
    stacked = _stacked(tensors)
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return copied, values, host


def host_read(queued: tuple) -> list[float | None]:
    """The floats of a :func:`queue_host_read` (one wait, for the work queued before it)."""
    copied, values, host = queued
    if copied is None:
        return host_floats(*values)
    copied.synchronize()
    return _floats(values, host.tolist())
