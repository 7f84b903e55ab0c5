"""Continuous batching for the transformers backend: requests join and leave between decode steps.

One worker thread runs :func:`ContinuousBatcher.run`. Each turn of its loop:

1. takes every request that has arrived (cancelled ones finish at once),
2. admits waiting requests into free cache slots (lowest first, so the decode batch stays small)
   and prefills them together -- one vision-encoder pass per image/video -- up to a token budget,
   then streams each one's first token,
3. runs one decode step for every running request, streams each new token, and frees the slot of
   every request that finished (stop, length, stop string, cancel).

A request never waits for another to finish, and a running batch is never rebuilt: the cache
rows of the others are untouched when one joins or leaves. Each row keeps its own sampling
settings, penalties and (when seeded) random generator.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass

import torch

from qvl.infer.decode import DecodeModel
from qvl.infer.sampler import TokenStats, choose
from qvl.infer.types import Chunk

log = logging.getLogger("qvl.infer")


@dataclass
class Running:
    row: object  # transformers_backend._Row: streaming, stop strings, finish reason
    token: int  # the last token, fed at the next step
    generator: torch.Generator | None


class ContinuousBatcher:
    def __init__(self, decoder: DecodeModel, make_row, pad_id: int, rope_index, max_prefill_tokens: int = 16384,
                 max_prefill_batch: int = 8):
        self.decoder, self.make_row, self.pad_id, self.rope_index = decoder, make_row, pad_id, rope_index
        self.max_prefill_tokens, self.max_prefill_batch = max_prefill_tokens, max_prefill_batch
        vocab = decoder.head.shape[0]
        self.stats = TokenStats(decoder.slots, vocab, decoder.device)
        self.running: dict[int, Running] = {}
        self.waiting: deque = deque()
        self.steps = 0  # decode steps run (tests and logs)
        self.step_times: deque = deque(maxlen=100_000)  # seconds per decode step, sampling included

    # ------------------------------------------------------------------ the loop
    def run(self, jobs: queue.Queue) -> None:
        closing = False
        while not closing:
            if not self.running and not self.waiting:
                job = jobs.get()
                if job is None:
                    break
                self.waiting.append(job)
            while True:  # everything that arrived meanwhile
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    closing = True
                    break
                self.waiting.append(job)
            if closing:
                break
            self._admit()
            if self.running:
                self._guard(self._step, list(self.running))
        for slot in list(self.running):  # the engine closed under running requests: end their streams
            self.running[slot].row.job.handle.cancel()
            self._finish(slot)
        for job in self.waiting:
            job.handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=job.prepared.prompt_tokens))

    def _guard(self, fn, slots) -> None:
        """Run ``fn``; on failure report the error to the requests of ``slots`` and free them (never die)."""
        try:
            fn()
        except Exception as e:
            log.exception("generation failed")
            for slot in slots:
                run = self.running.pop(slot, None)
                if run is not None:
                    p = run.row.job.prepared
                    run.row.job.handle.emit(Chunk(finish_reason="error", error=f"{type(e).__name__}: {e}",
                                                  prompt_tokens=p.prompt_tokens))
                self.decoder.release(slot)

    # ------------------------------------------------------------------ joining
    def _admit(self) -> None:
        free = [s for s in range(self.decoder.slots) if s not in self.running]
        batch, tokens = [], 0
        while self.waiting and len(batch) < min(len(free), self.max_prefill_batch):
            job = self.waiting[0]
            if job.handle.cancelled:
                self.waiting.popleft()
                job.handle.emit(Chunk(finish_reason="cancelled", prompt_tokens=job.prepared.prompt_tokens))
                continue
            n = job.prepared.prompt_tokens
            if batch and tokens + n > self.max_prefill_tokens:
                break
            batch.append(self.waiting.popleft())
            tokens += n
        if not batch:
            return
        slots = free[:len(batch)]
        for slot, job in zip(slots, batch):  # placeholders, so a failing prefill reports to them
            self.running[slot] = Running(self.make_row(job), 0, None)
        self._guard(lambda: self._prefill(slots, batch), slots)

    def _prefill(self, slots: list[int], jobs: list) -> None:
        from qvl.data.collate import collate
        from qvl.data.packing import sample_positions

        d = self.decoder
        encs = [j.prepared.inputs for j in jobs]
        batch = collate(encs, pad_id=self.pad_id, padding_side="left")
        width = batch["input_ids"].shape[1]
        positions = torch.zeros(4, len(encs), width, dtype=torch.long)
        for i, enc in enumerate(encs):
            positions[:, i, width - len(enc):] = sample_positions(enc, self.rope_index)
        inputs = {k: (v.to(d.dtype) if k.startswith("pixel_values") else v).to(d.device) for k, v in batch.items()}
        logits = d.prefill(slots, inputs, positions.to(d.device), [len(e) for e in encs])
        params = []
        for slot, job, enc in zip(slots, jobs, encs):
            s = job.prepared.sampling
            self.stats.start(slot, enc.input_ids.tolist(), s)
            if s.seed is not None:
                self.running[slot].generator = torch.Generator(device=d.device).manual_seed(s.seed)
            params.append(s)
        self._emit(slots, logits, params)

    # ------------------------------------------------------------------ decoding
    def _step(self) -> None:
        t = time.perf_counter()
        slots = sorted(self.running)
        n_rows = slots[-1] + 1
        feed = [0] * n_rows
        for slot in slots:
            feed[slot] = self.running[slot].token
        logits = self.decoder.decode(torch.tensor(feed, device=self.decoder.device), n_rows)
        self.steps += 1
        self._emit(slots, logits[slots], [self.running[s].row.job.prepared.sampling for s in slots])
        self.step_times.append(time.perf_counter() - t)

    def _emit(self, slots: list[int], logits: torch.Tensor, params: list) -> None:
        gens = [self.running[s].generator for s in slots]
        tokens = choose(logits, slots, params, self.stats, gens).tolist()
        for slot, token in zip(slots, tokens):
            run = self.running[slot]
            run.token = token
            run.row.push(token)
            if run.row.finish is not None:
                self._finish(slot)

    def _finish(self, slot: int) -> None:
        run = self.running.pop(slot)
        run.row.close()
        self.decoder.release(slot)
