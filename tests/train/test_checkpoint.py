"""Checkpoints under several ranks (torchrun / DDP): one folder, every rank's RNG in it."""

from __future__ import annotations

import json
import time

import pytest
import torch.multiprocessing as mp
from train_helpers import checkpoint_rank

from qvl.train import checkpoint as ckpt


def test_checkpoint_saved_by_two_ranks(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint-1.tmp-4242").mkdir()  # a save killed half-way by an older run: cleaned up
    # spawn, not fork: a fork of this multi-threaded process (tqdm monitors, thread pools of earlier tests) once
    # left both ranks stuck inside os.fork() for good (clean-clone CI, 2026-12-07); a hang fails, it does not wait
    ranks = mp.start_processes(checkpoint_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 180
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("two ranks did not save and load a checkpoint within 180 s")
    c = out / "checkpoint-3"
    assert ckpt.is_complete(c) and ckpt.latest_checkpoint(out) == c
    assert (c / "rng_0.pt").is_file() and (c / "rng_1.pt").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # each rank resumes its own RNG stream
        assert r["after_load"] == r["after_save"]
    assert ranks[0]["after_save"] != ranks[1]["after_save"]
