"""One packed training row through Qwen3-VL with no host read on the step: what transformers' forward computes,
with everything that depends only on the row's layout prepared on the CPU when the row is packed (in the DataLoader
workers).

Why: transformers' ``Qwen3VLModel.forward`` reads the device several times per step. The vision tower derives its
segment bounds, rotary ids and position-embedding interpolation from ``grid_thw`` with ``repeat_interleave``,
``.tolist()`` and ``.item()``. The image features are split per image, and the placeholder counts are checked. The
deepstack features are gathered with boolean masks, and the loss is taken at the label positions. Every such read
waits for the GPU to drain, and the GPU then waits for the host to queue work again. On an H100 (8B LoRA) the tower
spanned ~110 ms of GPU time per step for ~30 ms of kernels (docs/benchmarks.md).

Here :func:`row_extras` computes those tensors on the CPU (``transformers.vision_utils``: the same functions the
tower calls, given precomputed values through its kwargs), together with the text samples' bounds and the label
positions. :func:`row_hidden` then runs embedding, tower, feature scatter and decoder (:func:`qvl.train.graphs.
decoder_stack`, or its CUDA graphs) on the device only. ``tests/train/test_row_forward.py`` checks the losses and
gradients against transformers' forward, with images, videos and text-only rows.
"""

from __future__ import annotations

import torch

from qvl.data.packing import IGNORE_INDEX

EXTRA_PREFIX = "qvl_"  # batch keys made here; LossModule takes them out before anything else sees the batch
MEDIA = (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos", "video_grid_thw"))
VISION_KEYS = ("cu_seqlens", "max_seqlen", "position_ids", "interp_indices", "interp_weights")


def vision_extras(grid_thw: torch.Tensor, vision_config) -> dict:
    """What the tower derives from ``grid_thw`` (CPU), under the kwarg names its forward pops them by."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    merge = vision_config.spatial_merge_size
    cu = get_vision_cu_seqlens(grid_thw)
    # the tower's own settings (Qwen3VLVisionModel.__init__: bilinear, align_corners=True)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw, num_grid_per_side=int(vision_config.num_position_embeddings ** 0.5), mode="bilinear",
        align_corners=True, spatial_merge_size=merge)
    return {"cu_seqlens": cu, "max_seqlen": int((cu[1:] - cu[:-1]).max()), "position_ids":
            get_vision_position_ids(grid_thw, merge), "interp_indices": indices, "interp_weights": weights}


def row_extras(batch: dict, model_config) -> dict:
    """A packed row's host-side facts as ``qvl_*`` tensors / ints: text sample bounds, label positions (in the
    shifted row), and per medium the tower's precomputed inputs."""
    from qvl.data.packing import sample_bounds_inputs

    bounds = sample_bounds_inputs(batch["position_ids"])
    out = {f"{EXTRA_PREFIX}cu_seqlens": bounds["qvl_cu_seqlens"], f"{EXTRA_PREFIX}longest": bounds["qvl_max_seqlen"]}
    labels = batch.get("labels")
    if labels is not None:
        out[f"{EXTRA_PREFIX}label_index"] = (labels[0, 1:] != IGNORE_INDEX).nonzero().flatten()
    for kind, _, grid_key in MEDIA:
        grid = batch.get(grid_key)
        if grid is not None:
            for key, value in vision_extras(grid, model_config.vision_config).items():
                out[f"{EXTRA_PREFIX}{kind}_{key}"] = value
    return out


def pad_media(batch: dict, multiple: int, merge: int) -> dict:
    """Each medium's patches grown to one of a few sizes (:func:`qvl.train.loss_head.gemm_rows`: multiples of
    ``multiple`` on a ladder) by one padding image at its end: zero pixels, grid (1, ``merge``, n / ``merge``)
    (``gemm_row_multiple``).

    Why: the tower's matmuls then meet a few patch counts instead of a new one almost every step, and cuBLAS holds
    the host until the GPU is idle the first time it meets a shape (``bench/experiments/kernel_loading.py``); :func:`warm_tower`
    meets them all before training. The tower attends within each image, so the padding changes no real patch's
    output; its tokens come after every real one, so :func:`row_hidden`'s ``masked_scatter`` places the real tokens
    and leaves them unused. The packed-row path only: transformers' own forward checks the features' count against
    the placeholders."""
    from qvl.train.loss_head import gemm_rows

    if multiple % (merge * merge):
        raise ValueError(f"a padding image needs a multiple of {merge * merge} patches, not {multiple}")
    for _, pixel_key, grid_key in MEDIA:
        pixels = batch.get(pixel_key)
        if pixels is None:
            continue
        n = gemm_rows(pixels.shape[0], multiple) - pixels.shape[0]  # a multiple of merge^2, as both counts are
        if not n:
            continue
        batch[pixel_key] = torch.cat([pixels, pixels.new_zeros(n, pixels.shape[1])])
        grid = batch[grid_key]
        batch[grid_key] = torch.cat([grid, grid.new_tensor([[1, merge, n // merge]])])
    return batch


def run_tower(visual, pixels: torch.Tensor, grid_thw: torch.Tensor, kw: dict):
    """The vision tower's output for ``pixels`` with its :func:`vision_extras` ``kw`` (on the device), compiled
    where :func:`qvl.train.compile.compile_vision_tower` compiled it."""
    compiled = getattr(visual, "qvl_compiled_forward", None)
    if compiled is not None:
        # no grid: ``kw`` holds all the tower derives from it, and as an input its media count would be fixed at 1
        # when the first call has one medium (the compiler specialises sizes 0 and 1), so the first call with two
        # would compile the tower again (8B tower on CPU: 43 s, then 15 s more)
        return compiled(visual, pixels.type(visual.dtype), grid_thw=None, **kw)
    return visual(pixels.type(visual.dtype), grid_thw=grid_thw, return_dict=True, **kw)


def warm_tower(visual, vision_config, most_patches: int, multiple: int, device) -> int:
    """Run the frozen tower once at every patch count :func:`pad_media` can make for up to ``most_patches`` patches
    (zero images, under the caller's autocast and grad mode: the step's), so that no step meets a matmul
    shape for the first time. Returns how many counts."""
    from qvl.train.loss_head import gemm_ladder

    merge = vision_config.spatial_merge_size
    patch_dim = vision_config.in_channels * vision_config.temporal_patch_size * vision_config.patch_size ** 2
    sizes = gemm_ladder(most_patches, multiple)
    side = 32 // merge * merge  # images of at most side x side patches: the warm-up's attention stays small
    for n in sizes:
        rows = [[1, side, side]] * (n // side ** 2) + ([[1, merge, n % side ** 2 // merge]] if n % side ** 2 else [])
        grid = torch.tensor(rows)
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vision_extras(grid, vision_config).items()}
        run_tower(visual, torch.zeros(n, patch_dim, device=device), grid.to(device), kw)
    return len(sizes)


def take_extras(batch: dict) -> dict:
    """Remove and return the ``qvl_*`` entries of ``batch`` (without their prefix)."""
    return {k[len(EXTRA_PREFIX):]: batch.pop(k) for k in [k for k in batch if k.startswith(EXTRA_PREFIX)]}


def usable(inner, config) -> bool:
    """The model is the Qwen3-VL this file knows: a tower with the interpolation :func:`vision_extras` assumes."""
    visual = getattr(inner, "visual", None)
    return (visual is not None and getattr(visual, "interpolation_mode", None) == "bilinear"
            and getattr(visual, "interpolation_align_corners", None) is True
            and hasattr(inner, "language_model") and hasattr(config, "image_token_id"))


def row_inputs(inner, config, batch: dict, extras: dict, encode=None) -> tuple[torch.Tensor, list]:
    """The decoder's inputs for one packed row: the embedded row (1, L, H) with each medium's tower output placed
    at its placeholder tokens, and the DeepStack features as dense tensors (zero away from visual tokens; adding
    zero there changes nothing), one per layer they join after. ``encode(kind, pixels, grid_thw, kw)``: the tower
    output of one kind's media (default :func:`run_tower`; serving puts its vision cache there)."""
    ids = batch["input_ids"]
    embeds = extras.get("embeds")  # looked up on the host (host_embeddings)
    if embeds is None:
        embeds = inner.get_input_embeddings()(ids)
    placed = []  # (mask (1, L, 1), deepstack features) per medium
    for kind, pixel_key, grid_key in MEDIA:
        pixels = batch.get(pixel_key)
        if pixels is None:
            continue
        kw = {key: extras[f"{kind}_{key}"] for key in VISION_KEYS}
        out = (encode(kind, pixels, batch[grid_key], kw) if encode is not None
               else run_tower(inner.visual, pixels, batch[grid_key], kw))
        mask = (ids == getattr(config, f"{kind}_token_id"))[..., None]
        embeds = embeds.masked_scatter(mask.expand_as(embeds), out.pooler_output.to(embeds.dtype))
        placed.append((mask, out.deepstack_features))
    deepstack = []
    if placed:
        for i in range(len(placed[0][1])):
            dense = torch.zeros_like(embeds)
            for mask, features in placed:
                dense.masked_scatter_(mask.expand_as(dense), features[i].to(dense.dtype))
            deepstack.append(dense)
    return embeds, deepstack


def row_hidden(inner, config, batch: dict, extras: dict, row_bound: bool = False, graphs=None) -> torch.Tensor:
    """The final-norm hidden states (1, L, H) of one packed row, as ``inner(**batch).last_hidden_state``.

    ``inner``: the ``Qwen3VLModel``; ``extras``: :func:`take_extras` of a batch made with :func:`row_extras`;
    ``row_bound``: the row's length as the attention's longest-sample bound (CUDA graphs); ``graphs``: a
    :class:`qvl.train.graphs.DecoderGraphs` to run the decoder with."""
    from qvl.train.graphs import decoder_stack

    embeds, deepstack = row_inputs(inner, config, batch, extras)
    positions, cu = batch["position_ids"], extras["cu_seqlens"]
    if graphs is not None:
        return graphs(embeds, positions, cu, deepstack)
    return decoder_stack(inner.language_model, embeds, positions[1:], positions[0], cu, deepstack,
                         batch["input_ids"].shape[1] if row_bound else extras["longest"])
