"""Mixture-of-experts experts for training as grouped GEMMs, LoRA on the experts included.

transformers' experts (``Qwen3VLMoeTextExperts``: 3-D ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I)) run
either as a Python loop over the experts (``eager``) or as grouped GEMMs over tokens sorted by expert (``grouped_mm``,
the default since transformers 5). peft's LoRA on them (``target_parameters``) reaches the weights through a
parametrization: each forward folds the delta into a copy of the whole expert stack (``W + s · B @ A``, E x out x in
per weight and layer, 1.2 GB a layer for 30B-A3B), and the backward makes that stack's full gradient (every expert,
routed to or not) before reducing it to the adapters' gradients. Here the adapters stay low-rank: for the tokens an
expert gets, ``x @ W_e^T + s · (x @ A_e^T) @ B_e^T``, three grouped GEMMs per projection whose widths are r, and the
frozen stack gets no gradient at all.

* :func:`grouped_mm` — ``(S, K) @ (G, K, N)`` by groups of rows: ``torch._grouped_mm`` where it runs (CUDA bf16, CPU
  eager fp32 / bf16; 16-byte aligned strides), else a loop over the groups (same result; it reads the group sizes on
  the host).
* :func:`experts_output` — the routed experts' output for (tokens, top-k index, top-k weights), plain functions.
* :func:`install` — every MoE block's experts (plain or peft-wrapped) computed by :func:`experts_output`;
  :func:`uninstall` undoes it. A state the fast path does not cover (adapters disabled or merged, several adapters,
  other expert layouts) runs the module's own forward.

Equivalence with transformers + peft (outputs, LoRA and router gradients): tests/models/test_moe_experts.py.
"""

from __future__ import annotations

import functools

import torch

EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_KERNEL_DTYPES = {"cuda": (torch.bfloat16,), "cpu": (torch.float32, torch.bfloat16)}


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def kernel_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm(x, w)`` runs for these operands: a dtype its kernel has on this device (bf16 only
    when compiled: its meta function knows no other), one dtype for both, and every stride a multiple of 16 bytes
    (the CPU and CUDA kernels refuse others), the output's rows (``w``'s last dim) too."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype or x.device != w.device:
        return False
    dtypes = (torch.bfloat16,) if _compiling() else _KERNEL_DTYPES.get(x.device.type, ())
    if x.dtype not in dtypes:
        return False
    size = x.element_size()
    strides = [s for t in (x, w) for s in t.stride() if s != 1] + [w.shape[-1]]
    return all(s * size % 16 == 0 for s in strides)


@torch.library.custom_op("qvl::contiguous_copy", mutates_args=())
def contiguous_copy(t: torch.Tensor) -> torch.Tensor:
    """A row-major copy of ``t`` that inductor keeps: it drops a plain ``.contiguous()`` in front of the grouped
    kernel (whose lowering states no stride needs) and hands the kernel the strided original, which it refuses
    ("Invalid strides/sizes"; torch 2.14, a LoRA factor with its expert dim innermost)."""
    return t.clone(memory_format=torch.contiguous_format)


@contiguous_copy.register_fake
def _(t):
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


contiguous_copy.register_autograd(lambda ctx, grad: grad, setup_context=lambda ctx, inputs, output: None)


def _kernel_layout(w: torch.Tensor) -> torch.Tensor:
    """``w`` (G, K, N) row- or column-major in its last two dims, as the kernel reads it (copied if neither)."""
    return w if w.stride(-1) == 1 or w.stride(-2) == 1 else contiguous_copy(w)


def looped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm` as one matmul per group (group sizes read on the host)."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    parts = [x[a:b] @ w[g] for g, (a, b) in enumerate(zip(starts, ends))]
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[-1])


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[g-1]:offs[g]`` of ``x`` (S, K) times ``w[g]`` (K, N): (S, N). ``offs`` int32 cumulative ends."""
    w = _kernel_layout(w)
    if kernel_fits(x, w):
        return torch._grouped_mm(x, w, offs=offs)
    return looped_mm(x, w, offs)


def expert_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, lora=None) -> torch.Tensor:
    """Each row of ``x`` through its expert's ``weight`` (E, out, in), as ``F.linear``; ``lora``: (lhs (E, out, r),
    rhs (E, r, in), scaling) with the delta ``scaling · lhs @ rhs``, applied low-rank."""
    y = grouped_mm(x, weight.transpose(-2, -1), offs)
    if lora is not None:
        lhs, rhs, scaling = lora
        lhs, rhs = lhs.to(weight.dtype), rhs.to(weight.dtype)
        pad = -rhs.shape[-2] % (16 // weight.element_size())  # zero rank rows: the kernel's 16-byte rows, same product
        if pad:
            lhs, rhs = torch.nn.functional.pad(lhs, (0, pad)), torch.nn.functional.pad(rhs, (0, 0, 0, pad))
        low = grouped_mm(x, rhs.transpose(-2, -1), offs)
        y = y + scaling * grouped_mm(low, lhs.transpose(-2, -1), offs)
    return y


def route(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offs): the (token, slot) pairs sorted by expert (indices into the flattened top-k), and each expert's
    end in that order (int32). No host sync: the ends come from a search in the sorted ids, not from counting on the
    host."""
    flat = top_k_index.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    experts = torch.arange(num_experts, device=flat.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
    return order, offs


def experts_output(hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, act_fn, gate_up_lora=None, down_lora=None) -> torch.Tensor:
    """What ``Qwen3VLMoeTextExperts.forward`` returns (hidden (T, H), top_k_* (T, k)): each token through its k
    experts (SwiGLU: act(gate) * up, then down), weighted and summed, with the experts' LoRA deltas if given."""
    tokens, k = top_k_index.shape
    order, offs = route(top_k_index, gate_up.shape[0])
    x = hidden[order // k].to(gate_up.dtype)
    gate, up = expert_linear(x, gate_up, offs, gate_up_lora).chunk(2, dim=-1)
    y = expert_linear(act_fn(gate) * up, down, offs, down_lora)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    # a gather and a sum over the k slots instead of index_add_: deterministic on CUDA (no atomics)
    return y[back].view(tokens, k, -1).sum(dim=1).to(hidden.dtype)


def delta_factors(wrapper, adapter: str):
    """(lhs, rhs, scaling) of a peft ``ParamWrapper``'s adapter on a 3-D weight, its delta ``scaling · lhs @ rhs`` in
    the weight's shape: peft's ``get_delta_factors`` where it has one (0.21 on), else the same read from the layout its
    ``get_delta_weight`` reads (lora_A (r·E, in), lora_B (out, r·E)), as peft 0.18-0.20 (which pyproject allows) keep
    them."""
    if hasattr(wrapper, "get_delta_factors"):
        return wrapper.get_delta_factors(adapter)
    experts = wrapper.num_experts
    a = wrapper.lora_A[adapter].weight
    b = wrapper.lora_B[adapter].weight
    a = a.reshape(experts, -1, a.shape[-1])  # (E, r, in)
    b = b.reshape(b.shape[0], -1, experts).permute(2, 0, 1)  # (E, out, r)
    if getattr(wrapper, "_did_swap_in_out_features", False):  # the weight is (E, out, in)
        return b, a, wrapper.scaling[adapter]
    return a.transpose(-2, -1), b.transpose(-2, -1), wrapper.scaling[adapter]


def _unwrap(module):
    """(experts module, {weight name: LoRA factors}) when the fast path covers ``module``'s state, else None: plain
    experts, or peft ``ParamWrapper``s around them each with one active, unmerged adapter on a weight here."""
    loras = {}
    while hasattr(module, "base_layer") and hasattr(module, "parameter_name"):  # peft's ParamWrapper
        if module.parameter_name not in EXPERT_WEIGHTS or module.parameter_name in loras:
            return None
        if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
            return None
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        if len(adapters) > 1 or getattr(module, "num_experts", 1) < 2:  # one adapter, on a stack of experts
            return None
        if adapters:
            loras[module.parameter_name] = delta_factors(module, adapters[0])
        module = module.base_layer
    if getattr(module, "is_transposed", False) or getattr(module, "has_bias", False):
        return None
    if not all(getattr(module, n, None) is not None and getattr(module, n).dim() == 3 for n in EXPERT_WEIGHTS):
        return None
    if module.gate_up_proj.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None  # low-precision stacks: peft adds the delta in a wider dtype
    return module, loras


def _forward(module, plain, hidden_states, top_k_index, top_k_weights):
    found = _unwrap(module)
    if found is None:
        return plain(hidden_states, top_k_index, top_k_weights)
    experts, loras = found
    return experts_output(hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj,
                          experts.act_fn, loras.get("gate_up_proj"), loras.get("down_proj"))


def _experts_modules(model):
    return [m.experts for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")
            and getattr(m, "experts", None) is not None]


def has_expert_lora(model) -> bool:
    """Whether LoRA reaches the experts of ``model`` (peft ``target_parameters`` on them)."""
    return any(".mlp.experts." in name and ".lora_" in name for name, _ in model.named_parameters())


def install(model) -> int:
    """Compute every MoE block's experts with :func:`experts_output` (after peft wrapped them, when LoRA reaches the
    experts: the outermost wrapper's forward is replaced). Returns the blocks switched."""
    n = 0
    for experts in _experts_modules(model):
        if "qvl_grouped_experts" in experts.__dict__ or _unwrap(experts) is None:
            continue
        plain = experts.forward
        experts.forward = functools.partial(_forward, experts, plain)
        experts.qvl_grouped_experts = True
        n += 1
    return n


def uninstall(model) -> None:
    """Undo :func:`install` (benchmarks reuse one model for several runs)."""
    for experts in _experts_modules(model):
        if experts.__dict__.pop("qvl_grouped_experts", None):
            del experts.forward
