"""Continuous batching for the transformers backend: requests join and leave between decode steps.

One worker thread runs :meth:`ContinuousBatcher.run`. Each turn of its loop:

1. takes every request that has arrived (cancelled ones finish at once),
2. admits waiting requests into free cache slots (lowest first, so the decode batch stays small)
   and prefills them together -- one vision-encoder pass per image/video -- then streams each
   one's first token. While others are decoding, arrivals are gathered for up to
   ``coalesce_s`` (or until ``max_prefill_batch`` wait) so one prefill serves several of them. A prompt above
   ``prefill_part_tokens`` arriving while others decode is prefilled that many tokens a turn instead
   (its parts between their decode steps),
3. launches one decode step for every running request -- the step, the sampling and the copy of
   the new tokens into the next step's input all stay on the GPU -- and only then streams the
   tokens of the *previous* step, so the host's work (detokenising, stop strings, finishing)
   overlaps the GPU's. A request that finished at step k has run step k+1 too; that token is
   dropped, and its slot is freed before anyone else can take it.

A request never waits for another to finish, and a running batch is never rebuilt: the cache
rows of the others are untouched when one joins or leaves. Each row keeps its own sampling
settings, penalties and (when seeded) random generator.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from qvl.infer.decode import DecodeModel
from qvl.infer.sampler import TokenStats, choose, row_params
from qvl.infer.types import Chunk
from qvl.infer.vision_cache import MEDIA

log = logging.getLogger("qvl.infer")


_serial = itertools.count()


@dataclass
class Running:
    row: object  # transformers_backend._Row: streaming, stop strings, finish reason
    generator: torch.Generator | None = None
    serial: int = field(default_factory=lambda: next(_serial))


# A prompt longer than this, arriving while others decode, is prefilled this many tokens per turn of the loop, so
# the others' decode steps go on between its parts: on an H200 an 8B prefill runs ~0.5 s per 16k tokens (~600
# dense TFLOP/s at 16 GFLOP a token), a stall of every stream; 4,096 tokens bound it to about an eighth of that.
PREFILL_PART_TOKENS = 4096


@dataclass
class InParts:
    """A long prompt being prefilled a part per turn (:func:`qvl.infer.packed_prefill.prefill_part`)."""

    slot: int
    job: object
    row: object  # its embedded row (qvl.infer.packed_prefill.Row)
    started: float
    arrived: float
    done: int = 0  # tokens prefilled so far


@dataclass
class InFlight:
    """A launched decode step whose tokens the host has not read yet."""

    rows: list  # (slot, Running) at launch
    tokens: torch.Tensor  # host buffer the tokens are copied into
    ready: object  # a CUDA event, or None on CPU (already done)


class ContinuousBatcher:
    def __init__(self, decoder: DecodeModel, make_row, pad_id: int, rope_index, max_prefill_tokens: int = 16384,
                 max_prefill_batch: int = 8, coalesce_s: float = 0.05, vision_cache=None,
                 reuse_prefixes: bool = True, prefill_part_tokens: int = PREFILL_PART_TOKENS):
        self.decoder, self.make_row, self.pad_id, self.rope_index = decoder, make_row, pad_id, rope_index
        self.vision_cache = vision_cache  # a qvl.infer.vision_cache.VisionCache in front of the tower, or None
        self.reuse_prefixes = reuse_prefixes  # qvl.infer.prefix: follow-ups run only what a freed slot lacks
        self.kept: dict = {}  # free slot -> qvl.infer.prefix.Kept (the prompt its cache still holds)
        self._kept_since: dict = {}  # running slot -> the prompt it was prefilled with
        self.reused_tokens = 0  # prompt tokens not prefilled again thanks to a kept prefix
        self.max_prefill_tokens, self.max_prefill_batch, self.coalesce_s = (
            max_prefill_tokens, max_prefill_batch, coalesce_s)
        # a longer prompt that arrives while others decode is prefilled this many tokens a turn, their decode steps
        # in between (packed prefill only); None while no prompt is being prefilled so
        self.prefill_part_tokens = prefill_part_tokens
        self.in_parts: InParts | None = None
        self.vocab = decoder.head.shape[0]
        self.stats = TokenStats(decoder.slots, self.vocab, decoder.device)
        self.running: dict[int, Running] = {}
        self.waiting: deque = deque()  # (arrival time, job)
        self.inflight: InFlight | None = None
        self._rows_key = None
        self._rows = None
        self._pinned = [self._host_buffer(), self._host_buffer()]
        self.steps = 0  # decode steps run (tests and logs)
        self.step_times: deque = deque(maxlen=100_000)  # seconds between consecutive steps' results
        self.prefill_times: deque = deque(maxlen=100_000)  # (requests, seconds) per prefill
        self._last_collect = None

    def _host_buffer(self) -> torch.Tensor:
        t = torch.zeros(self.decoder.slots, dtype=torch.long)
        return t.pin_memory() if self.decoder.device.type == "cuda" else t

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: queue.Queue) -> None:
        closing = False
        while not closing:
            if not self.running and not self.waiting and self.inflight is None and self.in_parts is None:
                job = jobs.get()
                if job is None:
                    break
                self.waiting.append((time.perf_counter(), job))
            while True:  # everything that arrived meanwhile
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                self.waiting.append((time.perf_counter(), job))
            if closing:
                break
            self.turn()
        last, self.inflight = self.inflight, None
        if last is not None:  # the tokens of the step launched last still reach their streams
            self._guard(lambda: self._collect(last), [s for s, _ in last.rows])
        for slot in list(self.running):  # the engine closed under running requests: end their streams
            row = self.running[slot].row
            row.job.handle.cancel()
            row.finish = row.finish or "cancelled"
            self._finish(slot)
        if self.in_parts is not None:
            self._drop_in_parts("cancelled")
        for _, job in self.waiting:
            job.handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=job.prepared.prompt_tokens))

    def turn(self) -> None:
        """Admit, launch a step, stream the previous step's tokens (tests call this directly)."""
        self._prefill_next_part()  # before admitting: a prompt starting in parts embeds now, its first part next turn
        self._admit()
        previous = self.inflight
        self.inflight = None
        if self.running:
            self._guard(self._launch, list(self.running))
        if previous is not None:
            self._guard(lambda: self._collect(previous), [s for s, _ in previous.rows])

    def submit(self, job) -> None:
        self.waiting.append((time.perf_counter(), job))

    def _guard(self, fn, slots) -> None:
        """Run ``fn``; on failure report the error to the requests of ``slots`` and free them (never die)."""
        try:
            fn()
        except Exception as e:
            log.exception("generation failed")
            self.inflight = None
            for slot in slots:
                run = self.running.pop(slot, None)
                if run is not None:
                    p = run.row.job.prepared
                    run.row.job.handle.emit(Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                                  prompt_tokens=p.prompt_tokens))
                self._release(slot, keep=False)  # what its cache holds is unknown after a failure

    # ------------------------------------------------------------------ joining
    def _admit(self) -> None:
        while self.waiting and self.waiting[0][1].handle.cancelled:
            _, job = self.waiting.popleft()
            job.handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=job.prepared.prompt_tokens))
        held = self.in_parts.slot if self.in_parts is not None else None
        free = [s for s in range(self.decoder.slots) if s not in self.running and s != held]
        if not self.waiting or not free:
            return
        if self._in_parts(self.waiting[0][1], free):  # a long prompt while others decode: a part per turn
            if self.in_parts is None:
                self._start_in_parts(self.waiting.popleft(), free)
                return
            head = self.waiting.popleft()  # it waits for the prompt in parts; those behind it need not
            try:
                self._admit_batch(free)
            finally:
                self.waiting.appendleft(head)
            return
        self._admit_batch(free)

    def _admit_batch(self, free: list[int]) -> None:
        """Prefill the waiting requests from the first on, as many as one prefill takes, into ``free`` slots."""
        if not self.waiting:
            return
        if self.running and len(self.waiting) < min(len(free), self.max_prefill_batch):
            if time.perf_counter() - self.waiting[0][0] < self.coalesce_s:
                return  # let a few more arrive: one prefill for several is much cheaper than one each
        batch, longest, total = [], 0, 0
        packed = self.decoder.prefill_impl == "packed"
        while self.waiting and len(batch) < min(len(free), self.max_prefill_batch):
            job = self.waiting[0][1]
            if job.handle.cancelled:
                self.waiting.popleft()
                job.handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=job.prepared.prompt_tokens))
                continue
            n = job.prepared.prompt_tokens
            if self._in_parts(job, free):  # it goes in parts, once it is first in line
                break
            # what the prefill computes is kept under max_prefill_tokens (a lone longer prompt goes alone): the
            # prompts' sum for a packed prefill, rows x longest for a padded one (every row padded to the longest;
            # its temporary cache holds as much)
            cost = total + n if packed else (len(batch) + 1) * max(longest, n)
            if batch and cost > self.max_prefill_tokens:
                break
            batch.append(self.waiting.popleft()[1])
            longest, total = max(longest, n), total + n
        if not batch:
            return
        fresh, taken = [], set()
        for job in batch:  # a follow-up of a finished request whose slot still holds its prompt runs only the rest
            hit = self._kept_prefix(job, [s for s in free if s not in taken]) if self.reuse_prefixes else None
            if hit is None:
                fresh.append(job)
                continue
            slot, start = hit
            taken.add(slot)
            self.running[slot] = Running(self.make_row(job))
            self._guard(lambda: self._prefill_rest(slot, job, start), [slot])
        if not fresh:
            return
        slots = sorted((s for s in free if s not in taken), key=self._slot_preference)[:len(fresh)]
        for slot, job in zip(slots, fresh):  # placeholders, so a failing prefill reports to them
            self.running[slot] = Running(self.make_row(job))
        self._guard(lambda: self._prefill(slots, fresh), slots)

    def _in_parts(self, job, free: list[int]) -> bool:
        """Whether ``job`` is prefilled in parts: a packed prefill, others decoding, a prompt above the part size
        (and below the cache's last entry, where decode steps park a slot that is not decoding) that no kept prefix
        shortens (those run only their rest)."""
        n = job.prepared.prompt_tokens
        return (bool(self.running) and self.decoder.prefill_impl == "packed" and self.prefill_part_tokens > 0
                and self.prefill_part_tokens < n < self.decoder.max_len - 1 and not job.handle.cancelled
                and job.prepared.inputs.positions is not None
                and not (self.reuse_prefixes and self._kept_prefix(job, free)))

    def _start_in_parts(self, waiting: tuple, free: list[int]) -> None:
        from qvl.infer import packed_prefill

        _, job = waiting
        slot = sorted(free, key=self._slot_preference)[0]
        self.kept.pop(slot, None)
        t = job.handle.prefill_started = time.perf_counter()  # the server's /debug/stages reads it
        p = job.prepared
        try:  # the embedding and the vision tower run now, for the whole prompt
            row = packed_prefill.embed(self.decoder, [p.inputs], [p.inputs.positions], [p.media_keys],
                                       self.vision_cache)
        except Exception as e:  # noqa: BLE001
            if self._fall_back(e):  # first in line again, to be prefilled a step down
                self.waiting.appendleft(waiting)
                return
            log.exception("prefill failed")
            job.handle.emit(Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                  prompt_tokens=p.prompt_tokens))
            return
        # decode steps between the parts compute this row too: its writes go to the cache's last entry, not
        # into the prompt (a slot never used would write from index 0 on)
        self.decoder.length[slot] = self.decoder.max_len - 1
        self.in_parts = InParts(slot, job, row, t, waiting[0])

    def _prefill_next_part(self) -> None:
        """The next part of the prompt being prefilled in parts; its first token once the last part is done."""
        from qvl.infer import packed_prefill
        from qvl.infer.prefix import Kept

        parts = self.in_parts
        if parts is None:
            return
        if parts.job.handle.cancelled:
            self._drop_in_parts("cancelled")
            return
        n = parts.job.prepared.prompt_tokens
        end = min(parts.done + self.prefill_part_tokens, n)
        try:
            logits = packed_prefill.prefill_part(self.decoder, parts.slot, parts.row, parts.done, end)
        except Exception as e:  # noqa: BLE001
            if self._fall_back(e):  # first in line again, to be prefilled a step down
                self.in_parts = None
                self._release(parts.slot, keep=False)
                self.waiting.appendleft((parts.arrived, parts.job))
                return
            log.exception("prefill failed")
            self._drop_in_parts("error", f"{type(e).__name__}: {e}")
            return
        parts.done = end
        if logits is None:
            return
        self.in_parts = None
        job, slot = parts.job, parts.slot
        self.running[slot] = Running(self.make_row(job))
        self._kept_since[slot] = Kept(job.prepared.inputs.input_ids, job.prepared.media_keys or {})
        self._guard(lambda: self._first_tokens([slot], [job], logits), [slot])
        self.prefill_times.append((1, time.perf_counter() - parts.started))

    def _drop_in_parts(self, reason: str, error: str | None = None) -> None:
        parts, self.in_parts = self.in_parts, None
        self._release(parts.slot, keep=False)  # part of a prompt is in its cache
        parts.job.handle.emit(Chunk(finish_reason=reason, error=error,
                                    prompt_tokens=parts.job.prepared.prompt_tokens))

    def _slot_preference(self, slot: int) -> tuple:
        """Sort key of a free slot for a new request. Rows below the decode batch's bucket are computed anyway:
        there, slots keeping no prompt come first, then those kept longest ago. Beyond it, the lowest slot (a
        batch that grows past its bucket costs every step; a lost kept prompt costs one prefill)."""
        from qvl.infer.decode import bucket

        d = self.decoder
        limit = bucket(max(self.running) + 1, d.batch_buckets) if self.running else 0
        kept = self.kept.get(slot)
        if slot < limit:
            return (0, slot) if kept is None else (1, kept.serial)
        return (2, slot)

    def _kept_prefix(self, job, free: list[int]):
        from qvl.infer.prefix import find

        enc = job.prepared.inputs
        if enc.positions is None:
            return None
        return find(self.kept, free, enc, job.prepared.media_keys, self.decoder.max_len)

    def _prefill_rest(self, slot: int, job, start: int) -> None:
        from qvl.infer.prefix import Kept, prefill_rest

        t = job.handle.prefill_started = time.perf_counter()  # the server's /debug/stages reads it
        self.kept.pop(slot, None)  # the slot's content changes now (a failure must not leave it matchable)
        enc = job.prepared.inputs
        logits = self._packed_or_padded(lambda p: p.rest(self.decoder, slot, start, enc, enc.positions),
                                        lambda: prefill_rest(self.decoder, slot, start, enc))
        self._kept_since[slot] = Kept(job.prepared.inputs.input_ids, job.prepared.media_keys or {})
        self.reused_tokens += start
        self._first_tokens([slot], [job], logits)
        self.prefill_times.append((1, time.perf_counter() - t))

    def _packed_or_padded(self, packed, padded) -> torch.Tensor:
        """``packed(qvl.infer.packed_prefill)`` where the decoder prefills packed, else ``padded()``; should the
        packed one fail other than for memory or the prompt, it runs again one step down (whole compiled layers ->
        pieces -> padded), now and from then on."""
        from qvl.infer import packed_prefill

        while self.decoder.prefill_impl == "packed":
            try:
                return packed(packed_prefill)
            except Exception as e:  # noqa: BLE001 -- the packed path's own failure: a step down serves
                if not self._fall_back(e):
                    raise
        return padded()

    def _fall_back(self, error: Exception) -> bool:
        """After the packed prefill raised ``error``: a step down from now on, said (True; see
        :func:`qvl.infer.packed_prefill.fall_back`), unless the failure is the request's own (out of memory, a prompt longer than the cache: the padded prefill would
        fail the same way)."""
        from qvl.infer import packed_prefill
        from qvl.infer.decode import PromptTooLong

        if isinstance(error, (torch.OutOfMemoryError, PromptTooLong)):
            return False
        packed_prefill.fall_back(self.decoder, error)
        return True

    def _prefill(self, slots: list[int], jobs: list) -> None:
        from qvl.data.packing import sample_positions
        from qvl.infer.prefix import Kept

        t = time.perf_counter()
        for job in jobs:  # the server's /debug/stages reads it
            job.handle.prefill_started = t
        d = self.decoder
        encs = [j.prepared.inputs for j in jobs]
        # the engine's prepare computed them off this thread
        positions = [e.positions if e.positions is not None else sample_positions(e, self.rope_index) for e in encs]
        for slot in slots:
            self.kept.pop(slot, None)
        logits = self._packed_or_padded(
            lambda p: p.prefill(d, slots, encs, positions, [j.prepared.media_keys for j in jobs], self.vision_cache),
            lambda: self._prefill_padded(slots, jobs, positions))
        for slot, job, enc in zip(slots, jobs, encs):
            if enc.positions is not None:  # what a follow-up needs to continue it (the engine's prepare sets it)
                self._kept_since[slot] = Kept(enc.input_ids, job.prepared.media_keys or {})
        self._first_tokens(slots, jobs, logits)
        self.prefill_times.append((len(jobs), time.perf_counter() - t))

    def _prefill_padded(self, slots: list[int], jobs: list, positions: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`DecodeModel.prefill`: transformers' forward over the prompts right-padded (the vision cache in
        front of its tower); -> last logits."""
        from qvl.data.collate import collate

        d = self.decoder
        encs = [j.prepared.inputs for j in jobs]
        # the token rows are collated here; the pixels are not concatenated on the host (8 448x448 images: 38 MB
        # copied on this thread) but sent to the device one sample at a time and joined there
        batch = collate([dataclasses.replace(e, pixel_values=None, pixel_values_videos=None) for e in encs],
                        pad_id=self.pad_id, padding_side="right")
        padded = torch.zeros(4, len(encs), batch["input_ids"].shape[1], dtype=torch.long)
        for i, p in enumerate(positions):
            padded[:, i, :p.shape[1]] = p
        inputs = {k: v.to(d.device) for k, v in batch.items()}
        for key, grid_key in MEDIA:
            parts = [getattr(e, key) for e in encs if getattr(e, key) is not None]
            if parts:  # pixels change dtype on the device (a CPU cast of a 1024x1024 image took ~10 ms)
                inputs[key] = torch.cat([p.to(d.device, non_blocking=True).to(d.dtype) for p in parts])
                keys = [k for j in jobs for k in ((j.prepared.media_keys or {}).get(key) or [])]
                if self.vision_cache is not None and len(keys) == len(inputs[grid_key]):
                    self.vision_cache.expect(inputs[key], keys)
        with self.vision_cache.attached() if self.vision_cache is not None else contextlib.nullcontext():
            return d.prefill(slots, inputs, padded.to(d.device), [len(e) for e in encs])

    def _first_tokens(self, slots: list[int], jobs: list, logits: torch.Tensor) -> None:
        """Sample each prefilled request's first token from its last logits, feed it to the next step, stream it."""
        d = self.decoder
        params = []
        for slot, job in zip(slots, jobs):
            s = job.prepared.sampling
            self.stats.start(slot, job.prepared.inputs.input_ids.tolist(), s)
            if s.seed is not None:
                self.running[slot].generator = torch.Generator(device=d.device).manual_seed(s.seed)
            params.append(s)
        rp = row_params(slots, params, [self.running[s].generator for s in slots], self.vocab, d.device)
        tokens = choose(logits, rp, self.stats)
        d.set_tokens(rp.slots, tokens)
        for slot, token in zip(slots, tokens.tolist()):
            self._push(slot, self.running[slot], token)

    # ------------------------------------------------------------------ decoding
    def _row_params(self, slots: list[int]):
        key = tuple((s, self.running[s].serial) for s in slots)
        if key != self._rows_key:
            self._rows_key = key
            self._rows = row_params(slots, [self.running[s].row.job.prepared.sampling for s in slots],
                                    [self.running[s].generator for s in slots], self.vocab, self.decoder.device)
        return self._rows

    def _launch(self) -> None:
        slots = sorted(self.running)
        rp = self._row_params(slots)
        logits = self.decoder.decode(slots[-1] + 1)
        tokens = choose(logits.index_select(0, rp.slots), rp, self.stats)
        self.decoder.set_tokens(rp.slots, tokens)  # the next step's input, without a trip through the host
        buf = self._pinned[self.steps % 2]
        ready = None
        if tokens.is_cuda:
            buf[:len(slots)].copy_(tokens, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        else:
            buf[:len(slots)] = tokens
        self.steps += 1
        self.inflight = InFlight([(s, self.running[s]) for s in slots], buf, ready)

    def _collect(self, step: InFlight) -> None:
        if step.ready is not None:
            step.ready.synchronize()
        now = time.perf_counter()
        if self._last_collect is not None:
            self.step_times.append(now - self._last_collect)
        self._last_collect = now if self.running else None
        for (slot, run), token in zip(step.rows, step.tokens[:len(step.rows)].tolist()):
            if self.running.get(slot) is run:  # not finished (or replaced) since the launch
                self._push(slot, run, token)

    def _push(self, slot: int, run: Running, token: int) -> None:
        run.row.push(token)
        if run.row.finish is not None:
            self._finish(slot)

    def _finish(self, slot: int) -> None:
        run = self.running.pop(slot)
        self._release(slot)  # before the stream ends: a client's follow-up must find the slot free and kept
        run.row.close()

    def _release(self, slot: int, keep: bool = True) -> None:
        """Free ``slot``; its prompt stays matchable for a follow-up (``keep``) until another prefill takes it."""
        d = self.decoder
        d.release(slot)
        # decode steps advance free rows of the batch too: park this one's writes at the cache's last entry,
        # outside any kept prompt
        d.length[slot] = d.max_len - 1
        prompt = self._kept_since.pop(slot, None)
        if keep and prompt is not None:
            self.kept[slot] = prompt
        else:
            self.kept.pop(slot, None)
        if not self.running:
            self._last_collect = None
