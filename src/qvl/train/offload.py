"""``activation_offloading``: what a recomputed decoder layer keeps for backward (its input: 2·h bytes a token, 10 KiB
at 32B) goes to pinned host memory in forward and comes back in backward, so a run with every layer recomputed keeps
about two layers' inputs on the GPU instead of all of them (64 x 20 MiB for a 2,048-token row at 32B: 1.25 GiB).

The tensors pass through autograd's saved-tensor hooks, entered around each recomputed layer's call
(:func:`qvl.train.graphs.decoder_stack`): the layer's checkpoint saves its inputs through them, eager or compiled (the
compiled layer's saved tensors go through the same hooks; the values and the single compiled graph are checked on
CPU, tests/train/test_offload.py). Only tensors at least as large as the layer's input move: weights, rotary tables
and sample bounds stay where they are. Both copies are queued on the current stream without waiting: the
device-to-host copy is ordered before any reuse of the freed GPU memory, and the copy back before the backward
kernels that read it.
"""

from __future__ import annotations

import contextlib

import torch


class HostActivations:
    """Saved-tensor hooks that keep large saved tensors in host memory. ``params``: tensors never moved (the model's
    weights, which a layer's checkpoint may save too). ``pin``: pinned host memory, copies that do not block
    (CUDA); on a CPU the copies are plain clones (what the tests use)."""

    def __init__(self, params, pin: bool):
        self.weights = {p.data_ptr() for p in params}
        self.pin = pin
        self.min_numel = 0
        self.moved_bytes = 0  # since the last reset(): what went to the host

    def pack(self, t: torch.Tensor):
        if t.numel() < self.min_numel or t.data_ptr() in self.weights or not t.is_contiguous() or t.is_sparse:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pin)
        host.copy_(t, non_blocking=self.pin)
        self.moved_bytes += t.numel() * t.element_size()
        return t.device, host

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=self.pin)

    def saving(self, layer_input: torch.Tensor):
        """The context for one recomputed layer's call: tensors the size of ``layer_input`` and up go to the host."""
        self.min_numel = layer_input.numel()
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def reset(self) -> int:
        moved, self.moved_bytes = self.moved_bytes, 0
        return moved


def recomputes(layer) -> bool:
    """Whether a decoder layer recomputes in backward (qvl's checkpoint inside a compiled layer, or transformers')."""
    return bool(getattr(layer, "qvl_recompute", False) or getattr(layer, "gradient_checkpointing", False))


def around(layer, offload: HostActivations | None, hidden: torch.Tensor):
    """The context to call ``layer`` in: ``offload``'s hooks for a recomputed layer while training, else nothing."""
    if offload is None or not layer.training or not torch.is_grad_enabled() or not recomputes(layer):
        return contextlib.nullcontext()
    return offload.saving(hidden)


def install(text_model, model, device: torch.device) -> HostActivations:
    """Offload the recomputed layers of ``text_model`` (the decoder stack :func:`qvl.train.graphs.decoder_stack`
    runs); undone by :func:`remove`."""
    text_model.qvl_offload = HostActivations(model.parameters(), pin=device.type == "cuda")
    return text_model.qvl_offload


def remove(text_model) -> None:
    text_model.__dict__.pop("qvl_offload", None)
