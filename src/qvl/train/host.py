"""What training keeps in, or reads back to, host memory.

* :func:`embeddings_to_host` / :func:`host_embed` — ``host_embeddings``: the frozen input-embedding table stays in
  host memory and each row's tokens are looked up there (:func:`embeddings_to_device` puts it back).
* :func:`host_floats` — a step's scalars copied to the host in one synchronisation; :func:`queue_host_read` /
  :func:`host_read` — the same copy queued at the end of its step, read later without waiting for later steps;
  :func:`seconds_between` — the GPU's time from one such step end to another.
"""

from __future__ import annotations

import torch


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
    The event also carries a timestamp (:func:`seconds_between`). With a tensor off the GPU (DeepSpeed's gradient
    norm under CPU offload) the values are read plainly when asked, the event still marking the step's end; off CUDA
    there is no event."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not any(t.is_cuda for t in tensors):
        return None, values, None
    copied = torch.cuda.Event(enable_timing=True)
    if not all(t.is_cuda for t in tensors):
        copied.record()
        return copied, values, None
    stacked = _stacked(tensors)
    host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    copied.record()
    return copied, values, host


def host_read(queued: tuple) -> list[float | None]:
    """The floats of a :func:`queue_host_read` (one wait, for the work queued before it)."""
    copied, values, host = queued
    if host is None:
        return host_floats(*values)
    copied.synchronize()
    return _floats(values, host.tolist())


def seconds_between(earlier: tuple | None, later: tuple) -> float | None:
    """Seconds on the GPU's clock from the end of the step queued as ``earlier`` to the end of ``later`` (both
    :func:`queue_host_read` results, both already read); None off CUDA or without an earlier step.

    Why not the host's clock: a step's numbers are read once the next step is queued, so when the host is the slow
    side the read of step N happens after it queued step N+1, and the GPU has run much of N+1 by the read of N+1. The
    gap between two reads then is the next step's queueing, not this step's work: a video run's only step after
    warm-up read 0.65 s (124k tok/s on an 8B model, H200, 2026-12-05). Between two step ends on the GPU lies exactly
    one step, idle time waiting for the host included."""
    if earlier is None or earlier[0] is None or later[0] is None:
        return None
    later[0].synchronize()  # done already where its values were read from pinned memory; a plain read may not say
    return earlier[0].elapsed_time(later[0]) / 1000.0
