"""What each training step reads: the seeded record order, rank shares, encoding, micro-batches and packed rows.

Data order is a pure function of (seed, epoch, position), with ``balance_tokens`` also of the records' estimated
lengths (every rank computes the same): resuming from a checkpoint at step S replays exactly the batches an
uninterrupted run would have seen after S. :mod:`qvl.train.loop` runs the steps.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from qvl.data.preprocess import TooLong
from qvl.errors import QvlError
from qvl.train.config import TrainConfig

if TYPE_CHECKING:
    from qvl.train.loop import Dist


def split_by_tokens(lengths: list[int], parts: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` split into ``parts`` groups of equal size (``len`` a multiple of ``parts``),
    each ascending, with the heaviest group as light as longest-processing-time greedy makes it: longest first
    (ties: lower position) into the lightest group with room (ties: lower group). Equal lengths give the strided
    split (position p to group p % parts), and so does any chunk where greedy would not beat it."""
    size = len(lengths) // parts
    groups: list[list[int]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for pos in sorted(range(len(lengths)), key=lambda q: (-lengths[q], q)):
        g = min((g for g in range(parts) if len(groups[g]) < size), key=loads.__getitem__)
        groups[g].append(pos)
        loads[g] += lengths[pos]
    strided = [list(range(g, len(lengths), parts)) for g in range(parts)]
    if max(loads, default=0) >= max((sum(lengths[q] for q in grp) for grp in strided), default=0):
        return strided
    return [sorted(grp) for grp in groups]


class Plan:
    """Which records form micro-batch ``j`` of epoch ``e`` on this rank, and which micro-batches form step ``s``.

    Each epoch has one seeded permutation (padded so every rank does equal work, like DistributedSampler);
    position ``j`` of every rank together takes its chunk ``j`` of ``per_device_train_batch_size x ranks`` records.
    Strided (default), rank r takes every N-th record of the chunk. Balanced (``balance_tokens``, with
    ``lengths``: record index -> estimated tokens), the chunk is split by :func:`split_by_tokens`: the same
    records per step, fewer tokens on the busiest rank. Both are pure functions of (seed, epoch, j, records).
    """

    def __init__(self, n_records: int, cfg: TrainConfig, dist: Dist, lengths=None):
        if n_records == 0:
            raise QvlError("dataset_use selects no records", where="dataset_use")
        self.n, self.cfg, self.dist = n_records, cfg, dist
        self.lengths = lengths  # e.g. qvl.data.lengths.TokenEstimate; only read when balanced
        self.balanced = lengths is not None and cfg.balances_tokens(dist.world_size)
        per_rank = math.ceil(n_records / dist.world_size)  # padded like DistributedSampler: equal work per rank
        self.micro_per_epoch = math.ceil(per_rank / cfg.per_device_train_batch_size)
        self.steps_per_epoch = math.ceil(self.micro_per_epoch / cfg.gradient_accumulation_steps)
        if cfg.max_steps > 0:
            self.total_steps = cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.steps_per_epoch * cfg.num_train_epochs))
        self._order: tuple[int, list[int]] | None = None  # (epoch, global order): the last epoch asked for

    def global_order(self, epoch: int) -> list[int]:
        """The epoch's seeded permutation of every record, padded to equal work per rank (the same on every rank)."""
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            per_rank = math.ceil(self.n / self.dist.world_size)
            order += order[: per_rank * self.dist.world_size - self.n]
            self._order = (epoch, order)
        return self._order[1]

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's strided share of the epoch's order."""
        return self.global_order(epoch)[self.dist.rank::self.dist.world_size]

    def micro_batch(self, epoch: int, j: int, order: list[int]) -> list[int]:
        """Record indices of micro-batch ``j`` on this rank; ``order`` is :meth:`epoch_order` (read when strided)."""
        bs = self.cfg.per_device_train_batch_size
        if not self.balanced:
            return order[j * bs:(j + 1) * bs]
        world = self.dist.world_size
        chunk = self.global_order(epoch)[j * bs * world:(j + 1) * bs * world]
        share = split_by_tokens([self.lengths(i) for i in chunk], world)[self.dist.rank]
        return [chunk[pos] for pos in share]

    def step_micro(self, step: int) -> tuple[int, range]:
        """(epoch, micro-batch indices) of global step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        acc = self.cfg.gradient_accumulation_steps
        return epoch, range(k * acc, min((k + 1) * acc, self.micro_per_epoch))


class Encoder:
    """Record -> Encoded, skipping (and counting) records that cannot be trained on."""

    def __init__(self, records, processor, cfg: TrainConfig):
        self.records, self.processor, self.cfg = records, processor, cfg
        self.budget = cfg.vision_budget()
        self.rope_index = None  # packed rows: a qvl.data.packing.RopeIndex, so workers compute the positions
        self.pixel_dtype = None  # pixels cast here (workers) to the vision tower's dtype: half the bytes to copy
        self.skipped: Counter = Counter()
        self.examples: dict[str, str] = {}

    def __call__(self, i: int):
        rec = self.records[i]
        if isinstance(rec.raw, list):
            raise QvlError("this record is a pack (a list of samples, as `qvl data pack` writes)", where=rec.origin,
                           fix="train packed files with data_packing: true")
        return self._encode(rec.raw, rec.data_path, rec.origin, rec.index)

    def samples(self, i: int) -> list:
        """The Encoded samples of record ``i``: one for a sample, each usable sample of a pack (data_packing)."""
        rec = self.records[i]
        if not isinstance(rec.raw, list):
            enc = self(i)
            return [] if enc is None else [enc]
        if not self.cfg.data_packing:
            self(i)  # raises with the fix
        out = []
        for k, raw in enumerate(rec.raw):
            enc = self._encode(raw, rec.data_path, f"{rec.origin}[{k}]", rec.index)
            if enc is not None:
                out.append(enc)
        return out

    def _encode(self, raw, data_path, origin: str, index: int):
        from qvl.data.preprocess import encode
        from qvl.data.samples import parse_sample

        sample, problems = parse_sample(raw, index, data_path, origin)
        if sample is None:
            return self._skip("invalid sample", origin, "; ".join(p.render() for p in problems[:2]))
        try:
            enc = encode(sample, self.processor, self.budget, self.cfg.model_max_length)
        except TooLong as e:
            if self.cfg.too_long == "error":
                raise QvlError(e.what, where=origin, fix=e.fix + "; or set too_long=skip") from None
            return self._skip("longer than model_max_length", origin, e.what)
        except QvlError as e:
            return self._skip("unreadable media or rejected by the processor", origin, e.what)
        if enc.num_label_tokens == 0:
            return self._skip("no assistant tokens to learn", origin, "")
        if self.rope_index is not None:
            from qvl.data.packing import sample_positions

            enc.positions = sample_positions(enc, self.rope_index)
        if self.pixel_dtype is not None:  # the model casts them the same way (round to nearest), on the GPU
            for key in ("pixel_values", "pixel_values_videos"):
                if getattr(enc, key) is not None:
                    setattr(enc, key, getattr(enc, key).to(self.pixel_dtype))
        return enc

    def _skip(self, reason: str, origin: str, detail: str):
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{origin}: {detail}"[:300])
        return None


class MicroBatches(torch.utils.data.Dataset):
    """Item ``j`` = the collated micro-batch ``j`` of one epoch (workers encode in parallel)."""

    def __init__(self, plan: Plan, encoder: Encoder, epoch: int, pad_id: int, pack_rows: bool = False,
                 row_multiple: int = 0, row_budget: int | None = None, media_multiple: int = 0):
        self.plan, self.encoder, self.epoch, self.pad_id = plan, encoder, epoch, pad_id
        self.order = plan.epoch_order(epoch)
        # packed rows built here (workers) when the loop regroups nothing across micro-batches (one process;
        # packed_row_tokens only with one micro-batch per step: row_budget, regrouped here then)
        self.pack_rows, self.row_multiple, self.row_budget = pack_rows, row_multiple, row_budget
        self.media_multiple = media_multiple

    def __len__(self):
        return self.plan.micro_per_epoch

    def __getitem__(self, j: int):
        from qvl.data.collate import collate

        ids = self.plan.micro_batch(self.epoch, j, self.order)
        packed = self.plan.cfg.data_flatten or self.plan.cfg.data_packing
        try:
            if packed:
                kept = [e for i in ids for e in self.encoder.samples(i)]
            else:
                kept = [e for e in (self.encoder(i) for i in ids) if e is not None]
        except QvlError as e:  # sent back as data: a worker would re-raise it as a traceback in a string
            return {"batch": None, "error": (e.what, e.where, e.fix), "skipped": {}}
        # workers have their own Encoder copy: report skips (and an example of each) with the batch;
        # plain dicts: the DataLoader's convert step would add a Counter to itself
        skipped, examples = dict(self.encoder.skipped), dict(self.encoder.examples)
        self.encoder.skipped.clear()
        item = {"batch": None, "skipped": skipped, "examples": examples}
        if not kept:
            return item
        if packed and self.pack_rows and self.encoder.rope_index is not None:  # positions came with the samples
            groups = (row_groups([len(e) for e in kept], self.row_budget) if self.row_budget
                      else [range(len(kept))])
            rows = [pack_micro_batch([kept[i] for i in g], self.encoder.rope_index, self.row_multiple, self.pad_id,
                                     self.media_multiple) for g in groups]
            return dict(item, batch=rows[0]) if len(rows) == 1 else dict(item, batches=rows)
        if packed:  # the loop regroups samples (packed_row_tokens, ranks), then packs them (see pack_micro_batch)
            return dict(item, samples=kept)
        return dict(item, batch=collate(kept, self.pad_id, "right"))


def micro_batches(plan: Plan, encoder: Encoder, epoch: int, start: int, pad_id: int, workers: int,
                  pack_rows: bool = False, pin_memory: bool = False, row_multiple: int = 0,
                  row_budget: int | None = None, media_multiple: int = 0):
    ds = MicroBatches(plan, encoder, epoch, pad_id, pack_rows, row_multiple, row_budget, media_multiple)
    sub = torch.utils.data.Subset(ds, range(start, len(ds)))
    # own generator: creating an iterator must not draw from the global RNG (dropout must replay on resume)
    gen = torch.Generator().manual_seed(plan.cfg.seed + epoch)
    # pin_memory: a loader thread copies each batch into pinned memory, so the step's copy to the GPU neither
    # blocks the host nor pins on the main thread (to_device)
    loader = torch.utils.data.DataLoader(sub, batch_size=None, shuffle=False, num_workers=workers, generator=gen,
                                         persistent_workers=False, prefetch_factor=2 if workers else None,
                                         pin_memory=pin_memory and workers > 0)
    yield from loader


def pack_micro_batch(encs, rope_index, row_multiple: int = 0, pad_id: int = 0, media_multiple: int = 0) -> dict:
    """One packed row (per-sample mRoPE, block-diagonal attention) for :class:`qvl.train.loss_module.LossModule`;
    with ``row_multiple`` grown to a multiple of that many tokens by a label-free padding sample (``padding``: how
    many tokens, popped before the forward); with ``media_multiple`` each medium's patches grown to a multiple of that many by a padding
    image (:func:`qvl.train.row_forward.pad_media`: the packed-row path only)."""
    from qvl.data.packing import pack, pad_row
    from qvl.train.row_forward import pad_media, row_extras

    batch = pack(encs, rope_index)
    batch.pop("use_cache")  # LossModule passes use_cache=False itself
    batch.pop("seq_lens")
    if row_multiple > 1:
        n = batch["input_ids"].shape[-1]
        batch = pad_row(batch, row_multiple, pad_id)
        batch["padding"] = batch["input_ids"].shape[-1] - n
    config = getattr(rope_index, "config", None) or getattr(getattr(rope_index, "__self__", None), "config", None)
    if config is not None and getattr(config, "vision_config", None) is not None:
        if media_multiple > 1:
            batch = pad_media(batch, media_multiple, config.vision_config.spatial_merge_size)
        batch.update(row_extras(batch, config))  # made here (a worker, mostly), not on the step
    return batch


def planned_rows(plan: Plan, start: int, steps: int, budget: int | None = None) -> list[list[int]]:
    """Each packed row's samples as estimated token counts (``plan.lengths``, a TokenEstimate), for ``steps`` steps
    from ``start``: the rows the loop will make, one per micro-batch, or with ``budget`` (``packed_row_tokens``) a
    step's samples regrouped as :func:`rows_by_budget` regroups them."""
    rows, orders = [], {}
    for step in range(start, min(plan.total_steps, start + steps)):
        epoch, micro = plan.step_micro(step)
        if epoch not in orders:
            orders[epoch] = plan.epoch_order(epoch)
        step_rows = [[n for i in plan.micro_batch(epoch, j, orders[epoch]) for n in plan.lengths.samples(i)]
                     for j in micro]
        if budget:
            flat = [n for row in step_rows for n in row]
            step_rows = [[flat[i] for i in r] for r in row_groups(flat, budget)]
        rows += step_rows
    return rows


def row_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of a step's samples grouped into rows of at most ``max_tokens`` tokens (best fit decreasing).

    A sample longer than the budget gets a row of its own (samples are never cut). Rows keep their
    samples in the original order. The loss is token-weighted over the whole step, so how samples are split into
    rows does not change it.
    """
    from qvl.data.packing import best_fit_decreasing

    plan = best_fit_decreasing(lengths, max_tokens)
    rows = [sorted(p) for p in plan.packs] + [[i] for i in plan.too_long]
    return sorted(rows, key=lambda r: r[0])


def rows_by_budget(items: list[dict], max_tokens: int) -> list[dict]:
    """A step's loader items (packed ``samples``) regrouped into items of one row of up to ``max_tokens`` each;
    skip counts ride on the first. No row (every sample skipped): one empty item."""
    if any(item.get("error") for item in items):
        return items
    flat = [e for item in items for e in item.get("samples") or []]
    skipped: Counter = Counter()
    examples: dict = {}
    for item in items:
        skipped.update(item["skipped"])
        for why, example in item.get("examples", {}).items():
            examples.setdefault(why, example)
    rows = [[flat[i] for i in r] for r in row_groups([len(e) for e in flat], max_tokens)]
    out = [{"batch": None, "skipped": {}, "examples": {}, "samples": r} for r in rows] or [{"batch": None}]
    out[0] = dict(out[0], skipped=dict(skipped), examples=examples)
    return out


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a micro-batch."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()) - batch.get("padding", 0)


def to_device(batch: dict, device) -> dict:
    """The batch's tensors on ``device``; to a GPU through pinned memory without blocking the host (a copy from
    pageable memory holds the host until the GPU has it)."""
    if device.type != "cuda":
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return {k: (v if v.is_pinned() else v.pin_memory()).to(device, non_blocking=True) if isinstance(v, torch.Tensor)
            else v for k, v in batch.items()}


def longest_planned_row(plan: Plan, cfg: TrainConfig, steps: int = 2000) -> int | None:
    """The longest packed row (estimated tokens, padded as CUDA graphs pad rows) of the run's first ``steps`` steps,
    or None for padded batches; what ``gradient_checkpointing_ratio: auto`` sizes the kept layers for."""
    if not (cfg.data_flatten or cfg.data_packing):
        return None
    from qvl.data.packing import graph_row_length

    longest = max((sum(row) for row in planned_rows(plan, 0, steps, cfg.row_budget())), default=0)
    if not longest:
        return None
    return graph_row_length(longest, cfg.cuda_graphs_row_multiple) if cfg.cuda_graphs is not False else longest
