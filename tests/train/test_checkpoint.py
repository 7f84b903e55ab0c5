"""Checkpoints under several ranks (torchrun / DDP): one folder, every rank's RNG in it."""

from __future__ import annotations

import json

import torch.multiprocessing as mp
from train_helpers import checkpoint_rank

from qvl.train import checkpoint as ckpt


def test_checkpoint_saved_by_two_ranks(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint-1.tmp-4242").mkdir()  # a save killed half-way by an older run: cleaned up
    mp.start_processes(checkpoint_rank, args=(2, str(tmp_path / "init"), str(out)), nprocs=2, join=True,
                       start_method="fork")  # fork: no second torch import per rank
    c = out / "checkpoint-3"
    assert ckpt.is_complete(c) and ckpt.latest_checkpoint(out) == c
    assert (c / "rng_0.pt").is_file() and (c / "rng_1.pt").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".checkpoint-")]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:  # each rank resumes its own RNG stream
        assert r["after_load"] == r["after_save"]
    assert ranks[0]["after_save"] != ranks[1]["after_save"]
