"""Packing: several samples in one row, each seeing only itself, with its own mRoPE positions.

Three rules make a packed row compute exactly what the samples would compute alone
(``shared/reference/transformers_qwen3vl.md`` §2):

* ``position_ids`` has 4 rows: row 0 restarts at 0 for every sample (transformers finds
  sample boundaries from it and builds a block-diagonal causal mask, or flash-attn's
  ``cu_seqlens``); rows 1-3 are each sample's own mRoPE positions. ``get_rope_index`` does
  not know about packing, so it runs per sample and the results are concatenated.
* ``attention_mask=None`` and ``use_cache=False``: with a cache (created by default, even in
  training) packing detection is skipped and samples silently attend to each other.
* The first token of each sample is never a label (it would be predicted from the previous
  sample's last token).

Without flash-attn, the block-diagonal mask for sdpa is a dense L x L tensor; at long L the
``qvl_flex`` attention (flex attention registered through transformers' attention
interface) builds a block-sparse mask instead. ``qvl_per_sample`` needs no mask at all: on a GPU one
flash-attention varlen call (``torch.nn.attention.varlen``) covers the row, elsewhere causal sdpa runs on
each sample's slice; either way the cost is per sample, not per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qvl.data.preprocess import IGNORE_INDEX, Encoded

FLEX_ATTENTION = "qvl_flex"
PER_SAMPLE_ATTENTION = "qvl_per_sample"


def rope_index_fn(model) -> Callable:
    """The model's ``get_rope_index`` (through PEFT / DDP wrappers)."""
    m = model
    for _ in range(6):
        if hasattr(m, "get_rope_index"):
            return m.get_rope_index
        m = getattr(m, "module", None) or getattr(m, "base_model", None) or getattr(m, "model", None)
        if m is None:
            break
    raise TypeError(f"{type(model).__name__} has no get_rope_index: not a Qwen3-VL model?")


class RopeIndex:
    """The model's ``get_rope_index`` without the model: its class and config only, so it pickles and runs in
    DataLoader workers (positions are computed there, off the training step). transformers' method reads only
    ``self.config`` and its own helper methods; any other method it asks for comes from the model's class."""

    def __init__(self, model):
        inner = rope_index_fn(model).__self__
        self.model_class, self.config = type(inner), inner.config

    def __call__(self, *args, **kwargs):
        return self.model_class.get_rope_index(self, *args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("model_class", "config"):  # not set yet (unpickling)
            raise AttributeError(name)
        import inspect

        attr = inspect.getattr_static(self.model_class, name)  # as the model would see it: bound, static, property
        return attr.__get__(self, type(self)) if hasattr(attr, "__get__") else attr


def _grids(enc: Encoded):
    return enc.image_grid_thw, enc.video_grid_thw


def sample_positions(enc: Encoded, rope_index: Callable) -> torch.Tensor:
    """(4, L) positions of one sample: text positions 0..L-1, then its T/H/W mRoPE rows."""
    image_grid, video_grid = _grids(enc)
    mrope, _ = rope_index(enc.input_ids[None], enc.mm_token_type_ids[None], image_grid, video_grid)
    text = torch.arange(len(enc), dtype=mrope.dtype, device=mrope.device)[None]
    return torch.cat([text, mrope[:, 0, :]], dim=0)


def pack(encs: Sequence[Encoded], rope_index: Callable) -> dict:
    """One row holding every sample, ready for ``model(**batch, use_cache=False)``."""
    if not encs:
        raise ValueError("nothing to pack")
    ids = torch.cat([e.input_ids for e in encs])[None]
    types = torch.cat([e.mm_token_type_ids for e in encs])[None]
    positions = torch.cat([e.positions if e.positions is not None else sample_positions(e, rope_index)
                           for e in encs], dim=1)[:, None, :]
    out = {"input_ids": ids, "mm_token_type_ids": types, "position_ids": positions, "attention_mask": None,
           "use_cache": False}
    if all(e.labels is not None for e in encs):
        labels = []
        for e in encs:
            lab = e.labels.clone()
            lab[0] = IGNORE_INDEX
            labels.append(lab)
        out["labels"] = torch.cat(labels)[None]
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(e, key) for e in encs if getattr(e, key) is not None]
        if parts:
            out[key] = torch.cat(parts)
    out["seq_lens"] = [len(e) for e in encs]  # for loss bookkeeping; drop before model(**batch)
    return out


def padded_length(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (``multiple`` <= 1: ``n``)."""
    return n if multiple <= 1 else -(-n // multiple) * multiple


def graph_row_length(n: int, multiple: int) -> int:
    """The length :func:`pad_row` gives a row of ``n`` tokens: the next multiple of ``multiple`` above ``n``, so
    there is always a padding segment (a row of k samples always has k + 1 segments: one recording per length)."""
    return padded_length(n + 1, multiple)


def pad_row(batch: dict, multiple: int, pad_id: int) -> dict:
    """A packed row (:func:`pack`) grown to :func:`graph_row_length` tokens by one padding segment at its end.

    The padding is a sample of its own (its text positions restart at 0, so attention keeps it apart), of pad
    tokens and no labels: the real samples' losses and gradients are unchanged. Rows then come in few lengths,
    which CUDA graphs need (one recording per length, ``cuda_graphs``).
    """
    ids = batch["input_ids"]
    n = ids.shape[-1]
    extra = graph_row_length(n, multiple) - n
    out = dict(batch)

    def grow(t: torch.Tensor, fill) -> torch.Tensor:
        tail = torch.full((*t.shape[:-1], extra), fill, dtype=t.dtype, device=t.device)
        return torch.cat([t, tail], dim=-1)

    out["input_ids"] = grow(ids, pad_id)
    if batch.get("mm_token_type_ids") is not None:
        out["mm_token_type_ids"] = grow(batch["mm_token_type_ids"], 0)
    if batch.get("labels") is not None:
        out["labels"] = grow(batch["labels"], IGNORE_INDEX)
    positions = batch["position_ids"]
    tail = torch.arange(extra, dtype=positions.dtype, device=positions.device).expand(*positions.shape[:-1], extra)
    out["position_ids"] = torch.cat([positions, tail], dim=-1)
    return out


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "seq_lens"}


# ---------------------------------------------------------------- block-sparse attention

def register_flex_attention() -> str:
    """Register ``qvl_flex``: flex attention with a block-sparse packed causal mask.

    Dense Qwen3-VL refuses transformers' built-in ``flex_attention`` (``_supports_flex_attn``
    is False) but accepts any function registered through the attention interface.
    """
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flex_attention_mask

    AttentionInterface.register(FLEX_ATTENTION, flex_attention_forward)
    AttentionMaskInterface.register(FLEX_ATTENTION, flex_attention_mask)
    return FLEX_ATTENTION


_bounds_cache: list = []  # (text positions tensor, its version, bounds, cu_seqlens): one host read per forward


def _cached_bounds(text_positions: torch.Tensor) -> tuple[list[tuple[int, int]], torch.Tensor]:
    for t, version, bounds, cu in _bounds_cache:
        if t is text_positions and version == t._version:
            return bounds, cu
    row = text_positions.reshape(-1) if text_positions.dim() == 1 else text_positions[0]
    starts = (row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = list(zip(starts, starts[1:] + [row.shape[0]]))
    cu = torch.tensor(starts + [row.shape[0]], dtype=torch.int32, device=row.device)
    _bounds_cache.append((text_positions, text_positions._version, bounds, cu))
    del _bounds_cache[:-8]
    return bounds, cu


def sample_bounds(text_positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each sample in a packed row, from its text positions (they restart at 0 per sample).

    Every layer of one forward (and its recomputation under checkpointing) gets the same tensor, so
    the answer is cached; the cache holds the tensor itself, so a new forward's tensor can never be
    mistaken for it.
    """
    return _cached_bounds(text_positions)[0]


def _varlen():
    """torch's flash-attention varlen kernel (torch >= 2.10), taking ``enable_gqa``, and whether this version spells
    causal as a window."""
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    fn = varlen_attn if "enable_gqa" in params else _grouped_heads(varlen_attn, "window_size" in params)
    return fn, "window_size" in params


def _grouped_heads(varlen_attn, has_window: bool):
    """``varlen_attn`` taking ``enable_gqa`` on a torch whose own does not (2.10, 2.11): grouped heads go to the flash
    kernel itself (forward and backward), which maps each query head to its group's key / value head.

    Repeating each key and value per query head first cost more than the attention on a follow-up turn's cached
    keys: two 113 us copies a layer against a 62 us kernel (H100, 2026-12-07,
    bench/results/followup_profile_whole_keys_h100.txt; after: followup_profile_grouped_h100.txt). In training the
    op's own backward sums each group's key / value gradients, so the repeat's copies, and the repeated keys and
    values a layer kept for its backward, are gone too (bench/experiments/results/layer_memory_grouped_h100.txt)."""
    def call(q, k, v, cu_q, cu_k, max_q, max_k, *, enable_gqa: bool = False, **kwargs):
        if k.shape[1] != q.shape[1] and enable_gqa:
            causal = tuple(kwargs["window_size"]) == (-1, 0) if has_window else kwargs["is_causal"]
            return _flash_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                  scale=kwargs.get("scale"))[0]
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kwargs)

    return call


def _flash_forward(*args, **kwargs):
    return torch.ops.aten._flash_attention_forward(*args, **kwargs)


_VARLEN = _varlen()


def varlen_available() -> bool:
    """This torch has the flash-attention varlen kernel (``per_sample`` attention uses it on a GPU)."""
    return _VARLEN is not None


def varlen_usable(query: torch.Tensor, dropout: float) -> bool:
    """The varlen kernel runs: CUDA on an Ampere or newer GPU (flash attention needs sm80+: a T4 or V100 raises),
    16-bit inputs, no dropout (it has none), and a torch that has it."""
    return (_VARLEN is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and not dropout and _ampere_or_newer(query.device.index))


def _ampere_or_newer(index: int | None) -> bool:
    # not lru_cache'd: compiled layers call this, and dynamo traces through a cache wrapper anyway, printing a
    # warning with a call stack; torch keeps the device's properties, so the eager call is cheap
    return torch.cuda.get_device_capability(index)[0] >= 8


def varlen_causal(query, key, value, cu: torch.Tensor, max_len: int, scaling=None, causal: bool = True,
                  key_cu: torch.Tensor | None = None, key_max: int | None = None) -> torch.Tensor:
    """Causal attention per sample of a packed row in one flash-attention call: (1, H, L, D) in, (1, L, H, D) out.
    ``causal=False``: full attention inside each segment (the vision tower's images and frames). ``key_cu`` /
    ``key_max``: the keys' own segments where they are longer than the queries' (queries that continue cached keys:
    flash aligns the causal mask to the segment's end, so each query sees the keys up to its own position)."""
    fn, has_window = _VARLEN
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (L, H, D)
    kwargs = {"scale": scaling}
    if k.shape[1] != q.shape[1]:
        kwargs["enable_gqa"] = True
    if has_window:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kwargs["is_causal"] = causal
    if key_cu is None:
        key_cu, key_max, k, v = cu, max_len, k.contiguous(), v.contiguous()
    # else cached keys / values, read where they are: flash takes any row and head strides (its last dimension
    # contiguous), and a copy would be the whole cache slot's
    out = fn(q.contiguous(), k, v, cu, key_cu, max_len, key_max, **kwargs)
    return out.unsqueeze(0)


BOUNDS_INPUTS = ("qvl_cu_seqlens", "qvl_max_seqlen")  # model kwargs: they reach every attention function


def sample_bounds_inputs(position_ids: torch.Tensor, row_bound: bool = False) -> dict:
    """A packed row's sample bounds as model kwargs for ``per_sample`` attention (read on the host once per forward).

    With them the attention reads nothing on the host, so dynamo can compile the whole attention module
    (``compile_layers``); without them each layer finds the bounds itself from its ``position_ids``.
    ``position_ids``: (4, 1, L) packed positions, text positions first (:func:`pack`).
    ``row_bound``: the longest sample's length is given as the row's length, an upper bound (the kernel only sizes
    its grid by it; the extra blocks exit at once): with CUDA graphs a new value would mean a new recording.
    """
    bounds, cu = _cached_bounds(position_ids[0] if position_ids.dim() == 3 else position_ids)
    longest = position_ids.shape[-1] if row_bound else max(e - s for s, e in bounds)
    return {"qvl_cu_seqlens": cu, "qvl_max_seqlen": longest}


def masked_causal(query, key, value, cu: torch.Tensor, dropout: float = 0.0, scaling=None) -> torch.Tensor:
    """Causal attention per sample from ``cu`` (sample starts + row length) with one block-diagonal mask.

    No host read, so it traces; used where the varlen kernel cannot run while compiling (CPU, fp32).
    The L x L boolean mask makes it for short rows (tests), not for long GPU rows.
    """
    import torch.nn.functional as F

    pos = torch.arange(query.shape[2], device=query.device)
    sample = torch.searchsorted(cu[1:].to(pos.dtype), pos, right=True)  # which sample each token is in
    mask = (sample[:, None] == sample[None, :]) & (pos[:, None] >= pos[None, :])
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous()


def per_sample_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                         **kwargs):
    """Causal attention inside each sample of a packed row: (1, H, L, D) -> (1, L, H, D), no L x L mask.

    On a GPU one flash-attention varlen call covers the row (cost per sample, not per row, and no
    per-shape planning on the host); elsewhere causal sdpa runs on each sample's slice. Anything that is
    not a single packed row (a padded batch, a mask, no positions) goes to sdpa. The bounds come from
    the ``qvl_cu_seqlens`` / ``qvl_max_seqlen`` kwargs when the caller gives them
    (:func:`sample_bounds_inputs`), else from ``position_ids``.
    """
    import torch.nn.functional as F

    positions, cu_in = kwargs.get("position_ids"), kwargs.get("qvl_cu_seqlens")
    if (query.shape[0] != 1 or attention_mask is not None or (positions is None and cu_in is None)
            or query.shape[2] != key.shape[2]):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        kwargs = {k: v for k, v in kwargs.items() if k not in BOUNDS_INPUTS}
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if cu_in is not None:
        if varlen_usable(query, dropout):
            return varlen_causal(query, key, value, cu_in, kwargs["qvl_max_seqlen"], scaling), None
        if torch.compiler.is_compiling():
            return masked_causal(query, key, value, cu_in, dropout, scaling), None
        if positions is not None:  # eager: the same bounds, read once per forward (cached), not once per layer
            bounds = _cached_bounds(positions)[0]
        else:
            starts = cu_in.tolist()
            bounds = list(zip(starts[:-1], starts[1:]))
    else:
        bounds, cu = _cached_bounds(positions)
        if varlen_usable(query, dropout):
            return varlen_causal(query, key, value, cu, max(e - s for s, e in bounds), scaling), None
    outs = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                           is_causal=True, scale=scaling, enable_gqa=True)
            for s, e in bounds]
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def register_per_sample_attention() -> str:
    """Register ``qvl_per_sample`` with transformers: the attention above, and a mask function that builds none."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PER_SAMPLE_ATTENTION, per_sample_attention)
    AttentionMaskInterface.register(PER_SAMPLE_ATTENTION, lambda *args, **kwargs: None)
    return PER_SAMPLE_ATTENTION


def use_packed_attention(model, impl: str = "auto") -> str:
    """Choose attention for packed rows: flash-attn varlen if installed, else flex, or 'sdpa' as asked.

    The vision tower keeps sdpa (it splits images itself); only the language model changes.
    """
    if impl == "auto":
        import importlib.util

        impl = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "flex"
    if impl == "flex":
        impl = register_flex_attention()
    elif impl == "per_sample":
        impl = register_per_sample_attention()
    language_model(model).config._attn_implementation = impl
    return impl


def language_model(model):
    """The text model (``.layers``, ``.norm``, ``.config``) of a Qwen3-VL model, through PEFT / DDP wrappers."""
    inner = model
    for _ in range(8):
        if hasattr(inner, "language_model"):
            return inner.language_model
        inner = getattr(inner, "module", None) or getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if inner is None:
            break
    raise TypeError(f"{type(model).__name__} has no language_model: not a Qwen3-VL model?")


# ---------------------------------------------------------------- offline bin packing

@dataclass
class PackPlan:
    packs: list[list[int]]  # indices into the input list, per pack
    too_long: list[int]
    capacity: int
    lengths: list[int]

    @property
    def fill_ratio(self) -> float:
        used = sum(self.lengths[i] for p in self.packs for i in p)
        return used / (len(self.packs) * self.capacity) if self.packs else 0.0


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> PackPlan:
    """Pack items into bins of ``capacity`` tokens: longest first, each into the fullest bin it fits.

    O(n log n) with a sorted list of remaining capacities. Items longer than ``capacity`` are
    returned in ``too_long``, never cut.
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining, pack index), sorted
    too_long = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            too_long.append(i)
            continue
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            remaining, p = free.pop(j)
            packs[p].append(i)
            bisect.insort(free, (remaining - n, p))
        else:
            packs.append([i])
            bisect.insort(free, (capacity - n, len(packs) - 1))
    return PackPlan(packs, sorted(too_long), capacity, list(lengths))
