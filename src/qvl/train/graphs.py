"""``cuda_graphs``: the LLM's decoder stack replayed as CUDA graphs while training, recorded once per row shape.

Why: without graphs a LoRA step on an H100 waits for the host a quarter of the time. Python, dynamo's guards, the
compiled layers' wrappers and the autograd engine launch ~5k kernels per step, and the GPU idles in the gaps (8B:
busy 77 % of a step; with the decoder replayed, 96 %: 2026-11-27, bench/train_throughput.py --trace). A CUDA graph replays a
recorded forward of all decoder layers as one call, and their backward (recompute included) as another.

What is recorded: the text model's rotary embedding, its decoder layers, the deepstack additions and the final norm.
This is the part whose shapes depend only on the row's length. The embedding, the vision tower (its shapes follow the
images), the LM head with the loss at the label positions and the optimizer run as before.

- **Shapes.** Rows are padded past their length to a multiple of ``cuda_graphs_row_multiple`` tokens
  (:func:`qvl.data.packing.pad_row`: always a padding segment, so k samples make k + 1 segments). There is one
  recording per (row length, samples in the row). The attention gets the row length as its longest-sample bound.
  The deepstack features (at the image positions, which vary) go in as dense (L, H) tensors that are zero
  elsewhere: adding zero there changes nothing.
- **When.** By default (``warmup_shapes: lazy``) a shape is recorded the first time a row of it comes, the shared
  buffers sized ahead for the longest row the plan makes (:meth:`DecoderGraphs.reserve`); with ``warmup_shapes:
  ahead`` the loop records every shape the next steps will make before the first one (:meth:`DecoderGraphs.prerecord`,
  shapes from :func:`planned_row_shapes`), and a row of another shape (a video's estimate off by a token, a skipped
  sample) is recorded when it comes.
- **Memory.** All recordings share one memory pool. That is safe because they never overlap: a forward replay is
  followed by its backward before any other graph runs, and nothing made inside a graph is kept past its replay.
  The large inputs and outputs are views of shared buffers, outside autograd. When a longer row comes, the buffers
  grow and the recordings are made again.
- **Gradients.** The backward graph adds the trainable weights' gradients into their standing ``.grad`` tensors
  (:func:`standing_grads`). Every replay checks that those tensors are still the ones it recorded.

A recording runs the stack's Python once more, forward and backward, without the GPU doing the work. The first one
warms up before (one real forward and backward, results dropped: the layers compile there). On an 8B model a
recording costs 0.1-2 s; 12-14 shapes took 23-107 s before the first step, compilation included.

:class:`DecoderGraphs` is called by ``LossModule`` through :func:`qvl.train.row_forward.row_hidden`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from qvl.data.packing import BOUNDS_INPUTS, graph_row_length, language_model, padded_length
from qvl.train.offload import around

@dataclass
class StaticRow:
    """The tensors a recording reads: the step's inputs are copied into them before each replay."""

    hidden: torch.Tensor  # (1, L, H) the embedded row (a view of a shared buffer)
    mrope: torch.Tensor  # (3, 1, L) temporal / height / width positions
    text_positions: torch.Tensor  # (1, L)
    cu_seqlens: torch.Tensor  # (samples + 1,) int32
    deepstack: list  # (1, L, H) each, views of shared buffers
    output: torch.Tensor  # (1, L, H) where the forward graph leaves the final norm's output
    grad_output: torch.Tensor  # (1, L, H) the gradient the backward graph starts from


@dataclass
class Recording:
    forward: torch.cuda.CUDAGraph
    backward: torch.cuda.CUDAGraph
    grads: tuple  # the .grad tensors the backward graph adds into


def deepstack_count(model_config) -> int:
    """How many decoder layers get deepstack features added (Qwen3-VL: one per ``deepstack_visual_indexes``)."""
    vision = getattr(model_config, "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or ())


def decoder_stack(text, hidden: torch.Tensor, mrope: torch.Tensor, text_positions: torch.Tensor, cu: torch.Tensor,
                  deepstack: list, longest) -> torch.Tensor:
    """The text model's forward on one packed row with per_sample attention, from embedded row (1, L, H) to final
    norm: rotary embedding, decoder layers with the deepstack features added (dense, zero away from visual tokens)
    after the first ``len(deepstack)`` layers, final norm; a recomputed layer's inputs kept in host memory when the
    text model carries an offload (``activation_offloading``). ``cu``: the samples' bounds (int32, device); ``longest``:
    the longest sample (or any bound above it: the row's length under CUDA graphs). What a recording holds
    (``tests/train/test_graphs.py`` checks it against transformers' forward)."""
    position_embeddings = text.rotary_emb(hidden, mrope)
    offload = getattr(text, "qvl_offload", None)  # activation_offloading (qvl.train.offload)
    for i, layer in enumerate(text.layers):
        with around(layer, offload, hidden):
            hidden = layer(hidden, attention_mask=None, position_ids=text_positions,
                           position_embeddings=position_embeddings, **{BOUNDS_INPUTS[0]: cu, BOUNDS_INPUTS[1]: longest})
        if i < len(deepstack):
            hidden = hidden + deepstack[i]
    return text.norm(hidden)


def recorded_stack(text, row: StaticRow) -> torch.Tensor:
    # The embedded row enters as a leaf that requires a gradient (nothing reads it): every decoder layer then gets an
    # input that requires one, as the eager path's layers do (PEFT's enable_input_require_grads), so the compiled
    # layer is one graph. With a plain buffer, layer 0 alone differed and compiled a second forward and backward
    # graph (8B on an H200: a recompile on `requires_grad` in TORCH_LOGS=recompiles, inside the first step's ~120 s
    # of decoder compilation). Cost: layer 0's backward also computes its input's gradient, ~1 % of the stack's work.
    hidden = row.hidden.detach().requires_grad_(True)
    return decoder_stack(text, hidden, row.mrope, row.text_positions, row.cu_seqlens, row.deepstack,
                         row.hidden.shape[1])


class _Replay(torch.autograd.Function):
    """Forward: replay the forward graph. Backward: replay the backward graph (it adds into the weights' ``.grad``).
    ``anchor`` only makes the output require grad: the weights' gradients do not go through autograd here."""

    @staticmethod
    def forward(ctx, recording: Recording, row: StaticRow, anchor: torch.Tensor):
        recording.forward.replay()
        ctx.recording, ctx.row = recording, row
        return row.output.clone()  # the shared buffer is overwritten by the next replay

    @staticmethod
    def backward(ctx, grad):
        ctx.row.grad_output.copy_(grad)
        ctx.recording.backward.replay()
        return None, None, None


def planned_row_shapes(rows, multiple: int) -> list[tuple[int, int]]:
    """The distinct recording shapes of ``rows`` (each a list of its samples' token counts, e.g. estimated by
    :class:`qvl.data.lengths.TokenEstimate`), padded as :func:`qvl.data.packing.pad_row` pads them: (row length,
    sample bounds = samples + the padding segment + 1), the longest first."""
    return sorted({(graph_row_length(sum(r), multiple), len(r) + 2) for r in rows if r}, reverse=True)


FIRST_CAPACITY = 8192  # tokens the shared buffers hold at first (8B: 5 x 64 MiB)


class DecoderGraphs:
    """``graphs(embeds, positions, cu, deepstack)``: the decoder stack's final-norm output for one packed row,
    replayed from a recording of its shape (made on first sight). Calls it cannot replay (no grad, not on a GPU,
    something before the decoder trains) run :func:`decoder_stack` eagerly, and each reason is said once."""

    def __init__(self, model, log=print):
        self.text = language_model(model)
        self.params = [p for name, p in self.text.named_parameters()
                       if p.requires_grad and not name.startswith("embed_tokens.")]
        # the recording takes the embedded row as a constant: nothing that makes it may train (PEFT's
        # enable_input_require_grads marks the embeddings as needing a gradient all the same: not a reason)
        self.upstream_trains = sorted({name.split(".visual.")[0] + ".visual" if ".visual." in name else name
                                       for name, p in model.named_parameters()
                                       if p.requires_grad and (".visual." in name or "embed_tokens" in name)})
        self.n_deepstack = deepstack_count(getattr(model, "config", self.text.config))
        self.log = log
        self.pool = None
        self.capacity = 0
        self.buffers: dict[str, object] = {}
        self.rows: dict[tuple, StaticRow] = {}
        self.recordings: dict[tuple, Recording] = {}
        self.replays = 0
        self.recorded = 0
        self.record_s = 0.0
        self.stream = None
        self.fallbacks: Counter = Counter()
        self.anchor = None
        # why no recording may be made now ('' when it may), or None: a row of a shape not recorded yet then runs
        # without graphs (set while the vision tower compiles in another thread, whose GPU work a recording on
        # this one must not meet)
        self.hold = None

    def close(self) -> None:
        """Drop every recording and buffer (their memory goes back once the pool's last graph is gone)."""
        self.recordings.clear()
        self.rows.clear()
        self.buffers.clear()
        self.pool = None

    def unfit(self, embeds: torch.Tensor, deepstack: list) -> str:
        """Why this row cannot replay a recording ('' when it can)."""
        if not (torch.is_grad_enabled() and self.text.training):
            return "not training (no gradients)"
        if embeds.dim() != 3 or embeds.shape[0] != 1 or not embeds.is_cuda:
            return "not one packed row of embeddings on a GPU"
        if self.upstream_trains:
            return f"trainable weights before the decoder ({self.upstream_trains[0]}, ...)"
        if deepstack and len(deepstack) != self.n_deepstack:
            return f"{len(deepstack)} deepstack features for {self.n_deepstack} layers"
        if any(p.grad is None for p in self.params):
            return "trainable weights without a standing .grad (graphs.standing_grads)"
        return ""

    def __call__(self, embeds: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, deepstack: list):
        """``embeds`` (1, L, H); ``positions`` (4, 1, L): text positions, then mRoPE; ``cu`` the samples' bounds;
        ``deepstack``: dense (1, L, H) features, or [] for a row without visual tokens."""
        length = embeds.shape[1]
        key = (length, cu.numel(), embeds.dtype)
        why = self.unfit(embeds, deepstack) or (self.hold() if self.hold is not None and self._new(key) else "")
        if why:
            if not self.fallbacks[why]:
                self.log(f"cuda_graphs: a forward ran without graphs: {why}")
            self.fallbacks[why] += 1
            return decoder_stack(self.text, embeds, positions[1:], positions[0], cu, deepstack, length)
        self._fit_buffers(length, embeds)
        row = self.rows.get(key) or self._new_row(key, embeds.device)
        # detached: the buffers stay out of autograd (nothing before the decoder trains, see unfit). Copying a
        # tensor that needs a gradient into one view of a buffer would make the buffer's other views (other row
        # shapes, recorded ahead) stale leaves that refuse the next copy
        row.hidden.copy_(embeds.detach())
        row.text_positions.copy_(positions[0])
        row.mrope.copy_(positions[1:])
        row.cu_seqlens.copy_(cu)
        for i, buf in enumerate(row.deepstack):
            if deepstack:
                buf.copy_(deepstack[i].detach())
            else:
                buf.zero_()
        recording = self.recordings.get(key)
        if recording is None or any(p.grad is not g for p, g in zip(self.params, recording.grads)):
            recording = self.recordings[key] = self._record(row)
        if self.anchor is None:
            self.anchor = torch.zeros((), device=embeds.device, requires_grad=True)
        self.replays += 1
        return _Replay.apply(recording, row, self.anchor)

    # ------------------------------------------------------------------ buffers and recordings

    def _new(self, key: tuple) -> bool:
        """A row of this shape would be recorded (or the buffers grown, dropping every recording)."""
        recording = self.recordings.get(key)
        return (key[0] > self.capacity or recording is None
                or any(p.grad is not g for p, g in zip(self.params, recording.grads)))

    def _fit_buffers(self, length: int, like: torch.Tensor) -> None:
        """Shared (1, capacity, H) buffers for rows of up to ``capacity`` tokens (at first twice this row, at least
        ``FIRST_CAPACITY``: a few rows longer than the first are the rule). A longer row doubles them and drops every
        recording (they hold the old buffers' addresses) with their memory pool (released with its last graph; the
        next recording starts a new one)."""
        if length <= self.capacity and self.buffers.get("dtype") == like.dtype:
            return
        self.recordings.clear()
        self.rows.clear()
        self.pool = None
        self.capacity = padded_length(max(2 * length, FIRST_CAPACITY, 2 * self.capacity), 256)
        make = lambda: torch.zeros(1, self.capacity, like.shape[-1], dtype=like.dtype, device=like.device)  # noqa: E731
        # one buffer for the output and the gradient that comes back for it: the output is copied out at once
        # (_Replay.forward), and the gradient is written only when the backward replays
        shared = make()
        self.buffers = {"dtype": like.dtype, "hidden": make(), "output": shared, "grad_output": shared,
                        "deepstack": [make() for _ in range(self.n_deepstack)]}

    def _new_row(self, key: tuple, device) -> StaticRow:
        length, bounds, _ = key
        b = self.buffers
        row = StaticRow(hidden=b["hidden"][:, :length], mrope=torch.zeros(3, 1, length, dtype=torch.long, device=device),
                        text_positions=torch.zeros(1, length, dtype=torch.long, device=device),
                        cu_seqlens=torch.zeros(bounds, dtype=torch.int32, device=device),
                        deepstack=[t[:, :length] for t in b["deepstack"]], output=b["output"][:, :length],
                        grad_output=b["grad_output"][:, :length])
        self.rows[key] = row
        return row

    def _record(self, row: StaticRow) -> Recording:
        """Record the forward and the backward of ``row``'s shape. The first recording warms up before (one real
        forward and backward, results dropped: the compiled layers build their backward, libraries initialise);
        later shapes reuse the compiled code (dynamic shapes). A recording that fails is made again after a warm-up.
        """
        import time

        from qvl.train.compile import compile_seconds

        t0, compiled0 = time.perf_counter(), compile_seconds()
        try:
            recording = self._capture(row, warm_up=self.recorded == 0)
        except RuntimeError as e:  # e.g. a shape that makes dynamo compile again, which a capture cannot hold
            self.log(f"cuda_graphs: recording a {row.hidden.shape[1]}-token row failed ({str(e).splitlines()[0]}); "
                     "warming up and recording again")
            torch.cuda.synchronize()
            recording = self._capture(row, warm_up=True)
        torch.cuda.current_stream().synchronize()
        # compilation the warm-up pass set off is counted as compiling (compile_seconds), not as recording
        self.record_s += time.perf_counter() - t0 - (compile_seconds() - compiled0)
        self.recorded += 1
        return recording

    def _capture(self, row: StaticRow, warm_up: bool) -> Recording:
        params, grads = self.params, tuple(p.grad for p in self.params)
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if warm_up:
                out = recorded_stack(self.text, row)
                torch.autograd.grad(out, params, grad_outputs=torch.zeros_like(out), allow_unused=True)
                del out
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # capture_begin / capture_end, not torch.cuda.graph: that one syncs the device and empties the caching
            # allocators (pinned host memory included) before every recording
            forward, backward = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            forward.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                out = recorded_stack(self.text, row)
                row.output.copy_(out.detach())
            finally:
                forward.capture_end()
            backward.capture_begin(self.pool, capture_error_mode="thread_local")
            try:
                computed = torch.autograd.grad(out, params, grad_outputs=row.grad_output, allow_unused=True)
                pairs = [(g, c) for g, c in zip(grads, computed) if c is not None]
                if pairs:
                    torch._foreach_add_([g for g, _ in pairs], [c for _, c in pairs])
            finally:
                backward.capture_end()
            del out, computed, pairs  # their memory goes back to the pool: the next recording may reuse it
        torch.cuda.current_stream().wait_stream(self.stream)
        return Recording(forward=forward, backward=backward, grads=grads)

    def reserve(self, length: int, dtype: torch.dtype, device) -> None:
        """Size the shared buffers for rows of up to ``length`` tokens now (recording nothing), so that recordings
        made as rows come are not dropped and made again when a longer row grows the buffers."""
        if length and not self.unfit(torch.empty(1, 1, 1, device=device), []):
            self._fit_buffers(length, torch.empty(1, 1, self.text.config.hidden_size, dtype=dtype, device=device))

    def prerecord(self, shapes: list[tuple[int, int]], dtype: torch.dtype, device) -> int:
        """Record ``shapes`` ((row length, sample bounds), :func:`planned_row_shapes`) before training, so that
        steps replay instead of recording. The longest first: the shared buffers are sized once. The recordings
        read placeholder rows (zero embeddings, evenly split samples): a recording holds shapes, not values. Run it
        under the step's autocast. Returns how many it recorded (none where steps could not replay them: on a
        CPU, for instance)."""
        if not shapes or self.unfit(torch.empty(1, 1, 1, device=device), []):
            return 0
        before = self.recorded
        like = torch.empty(1, 1, self.text.config.hidden_size, dtype=dtype, device=device)
        self._fit_buffers(max(length for length, _ in shapes), like)
        for length, bounds in sorted(shapes, reverse=True):
            key = (length, bounds, dtype)
            if key in self.recordings:
                continue
            row = self.rows.get(key) or self._new_row(key, device)
            row.hidden.zero_()
            for buf in row.deepstack:
                buf.zero_()
            positions = torch.arange(length, device=device)
            row.text_positions.copy_(positions)
            row.mrope.copy_(positions.expand(3, 1, length))
            row.cu_seqlens.copy_(torch.linspace(0, length, bounds, device=device).round().int())
            self.recordings[key] = self._record(row)
        # the first recording's warm-up ran a real forward and backward outside the pool: its blocks stay cached
        # by the caching allocator unless given back now (the graphs' own pool is not touched)
        torch.cuda.empty_cache()
        return self.recorded - before

    def summary(self) -> str:
        fell = f"; {sum(self.fallbacks.values())} without graphs" if self.fallbacks else ""
        return (f"{self.replays} replays of {self.recorded} recordings ({len(self.recordings)} row shapes kept, "
                f"{self.record_s:.1f} s recording (compilation apart), rows up to {self.capacity:,} tokens){fell}")


GRAPHS_AUTO_MIN_GIB = 40  # cuda_graphs auto: cards with at least this much memory (the graphs' pool: 10-22 GiB at 8B)
# cuda_graphs auto: rows of up to this many tokens (padded as the graphs pad them). What a replay saves is the host's
# launch gaps, a share of the step that shrinks as rows grow: measured a gain at the 8B text YAML's rows (up to 8,192
# tokens). At the video YAML's (up to 15,616) the 8B run ran out of memory on an H100 80GB at its first step, the
# recordings' pool (16.7 GiB) beside 19.5 GiB the other pool held unused (2026-12-07,
# bench/results/train_video_graphs_h100.json), where without graphs it trained at 6,575 tok/s
# (train_video_nographs_h100.json)
GRAPHS_AUTO_MAX_ROW = 12288


def cuda_graphs_choice(choice, device: torch.device, world_size: int, per_sample: bool, varlen: bool,
                       compiled: bool = True, lora: bool = True, upstream_trains: bool = False,
                       total_gib: float | None = None, row_tokens: int | None = None) -> tuple[bool, str]:
    """(CUDA graphs?, why) for the loop: the LLM's decoder stack replayed as CUDA graphs (:mod:`qvl.train.graphs`).

    A replay launches a whole forward or backward of the stack at once: the GPU no longer waits for the host between
    kernels (8B LoRA on an H100: busy 77 % -> 96 % of a step, +11 % tokens/s with every row shape recorded ahead;
    docs/benchmarks.md). Built and tested for one process, packed rows with per_sample attention on the flash varlen
    kernel (``varlen``: torch >= 2.10 and bf16; its sample bounds are device tensors, no host read). ``auto`` turns
    it on where it was measured: compiled layers, LoRA with nothing before the decoder training, a card of at least
    ``GRAPHS_AUTO_MIN_GIB`` (the graphs' memory pool adds to the reserved memory), rows (``row_tokens``: the
    longest the run's plan makes) of at most ``GRAPHS_AUTO_MAX_ROW``; ``true`` wherever it can run."""
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
    if row_tokens is not None and row_tokens > GRAPHS_AUTO_MAX_ROW:
        return False, (f"cuda_graphs auto: off for rows of up to {row_tokens:,} tokens (on up to "
                       f"{GRAPHS_AUTO_MAX_ROW:,}: longer rows keep the GPU busy between launches, and their "
                       "recordings' memory pool ran an 8B video run out of memory on an 80 GB card); true forces it")
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
