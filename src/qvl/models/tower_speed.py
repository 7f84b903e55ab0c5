"""Two changes to a frozen Qwen3-VL vision tower's forward that compute the same values with less GPU work, for the
compiled tower of training (:func:`qvl.train.compile.compile_vision_tower`).

The profile of an 8B LoRA step (1 x H200, 2026-11-28, ``bench/train_throughput.py --profile-row qvl-fit-host``) put 60-74 ms of a 210-280 ms step in the
frozen tower, which MFU does not count. Two parts of it are not the tower's work:

- **The patch embedding** is a ``Conv3d`` whose kernel is its stride (each patch is one output), so it is a matmul of
  the flattened patches with the flattened kernel. cuDNN ran it as a generic implicit-GEMM convolution: 0.5-2.7 ms
  per call for a matmul of ~0.1 ms. :func:`linear_patch_embed` runs it as ``F.linear`` on the same weights.
- **The rotary cos / sin** are computed once per forward, but inductor inlines a cheap elementwise value into each
  consumer instead of storing it, so every block's q / k rotary kernel recomputed cos and sin of every patch
  (4 kernels a block, 7.8-9.9 ms a step). :func:`stored_rotary` passes them through :func:`materialize`, an op
  inductor cannot fuse through, so they are computed once and read by the blocks.

Both are undone by :func:`restore` (benchmarks reuse one model).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


@torch.library.custom_op("qvl::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a stored tensor: a copy inductor cannot fuse into the ops that read it (so they read it, not recompute
    it)."""
    return x.clone()


@materialize.register_fake
def _materialize_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


materialize.register_autograd(lambda ctx, grad: grad)


def _linear_patch_embed_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.proj.weight  # (embed, channels, temporal, patch, patch): one output per patch
    patches = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(patches, weight.flatten(1), self.proj.bias)


def _stored_rotary_forward(self, *args, **kwargs):
    return tuple(materialize(t) for t in type(self).forward(self, *args, **kwargs))


def _patch_embed(visual):
    embed = getattr(visual, "patch_embed", None)
    proj = getattr(embed, "proj", None)
    if not isinstance(proj, torch.nn.Conv3d) or tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding):
        return None
    return embed


def linear_patch_embed(visual) -> bool:
    """Run ``visual.patch_embed`` (a Conv3d whose kernel is its stride) as a matmul. False where it is not one."""
    embed = _patch_embed(visual)
    if embed is None:
        return False
    embed.forward = types.MethodType(_linear_patch_embed_forward, embed)
    return True


def stored_rotary(visual) -> bool:
    """Have ``visual.rotary_pos_emb``'s (cos, sin) stored once per forward, not recomputed by each block's compiled
    kernels. False where the tower has no such module."""
    rotary = getattr(visual, "rotary_pos_emb", None)
    if rotary is None:
        return False
    rotary.forward = types.MethodType(_stored_rotary_forward, rotary)
    return True


def restore(visual) -> None:
    """Undo :func:`linear_patch_embed` and :func:`stored_rotary`."""
    for name in ("patch_embed", "rotary_pos_emb"):
        module = getattr(visual, name, None)
        if module is not None:
            module.__dict__.pop("forward", None)
