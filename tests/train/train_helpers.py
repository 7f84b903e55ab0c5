"""Data makers shared by the training tests (a module of its own: `conftest` is ambiguous across test dirs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40)}
QUESTION = "What color is the image? Answer with one word."


def make_colour_data(folder, n: int, seed: int = 0, side: int = 64, text_only: int = 0) -> str:
    """``n`` solid noisy images, each asked for its colour; plus ``text_only`` text samples. Returns the jsonl path."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    names = list(COLOURS)
    for i in range(n):
        c = names[i % len(names)]
        arr = np.clip(np.array(COLOURS[c]) + rng.normal(0, 20, (side, side, 3)), 0, 255).astype("uint8")
        Image.fromarray(arr).save(folder / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png",
                     "conversations": [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                       {"from": "gpt", "value": c}]})
    for i in range(text_only):
        rows.append({"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def checkpoint_rank(rank: int, world: int, init_file: str, out: str) -> None:
    """One torchrun-like rank (gloo, CPU): save a checkpoint together, then each rank restores its own RNG."""
    import torch

    from qvl.train import checkpoint as ckpt

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # ranks draw different dropout masks
        model = torch.nn.Linear(2, 2)
        opt = torch.optim.AdamW(model.parameters())
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        ckpt.save_checkpoint(out, 3, model, opt, sched, {"step": 3}, rank=rank)
        after_save = torch.rand(3).tolist()
        torch.distributed.barrier()
        ckpt.load_checkpoint(f"{out}/checkpoint-3", model, opt, sched, rank=rank)
        after_load = torch.rand(3).tolist()
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"after_save": after_save, "after_load": after_load}, f)
    finally:
        torch.distributed.destroy_process_group()


def run_two_ranks(args: list[str], timeout: int = 240):
    """``python -m qvl.train ARGS nproc=2`` in a clean environment; a hang (timeout) fails the test."""
    import os
    import subprocess
    import sys

    import pytest

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root / "src"))
    for var in ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    try:  # a hang (a collective one rank never joins) turns into a failure
        return subprocess.run([sys.executable, "-m", "qvl.train", *args, "nproc=2"], capture_output=True, text=True,
                              check=False, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"2-rank run did not finish in {timeout} s (hang?): {(e.stdout or b'')[-2000:]!r}")


def packed_lora_model(cfg):
    """The tiny model set up as the loop sets it up for packed rows (training mode, per_sample attention), seeded, with
    an Encoder of ``cfg``'s data and the model's rope index: (model, processor, encoder, rope_index)."""
    import torch

    from qvl.data.packing import rope_index_fn, use_packed_attention
    from qvl.data.registry import load_mixture
    from qvl.models.load import load
    from qvl.train import components as comp
    from qvl.train.batches import Encoder

    torch.manual_seed(0)
    model, processor = load(cfg.model_name_or_path)
    model = comp.apply_training_mode(model, cfg)
    model.train()
    use_packed_attention(model, "per_sample")
    encoder = Encoder(load_mixture(cfg.dataset_use, None, seed=cfg.seed), processor, cfg)
    return model, processor, encoder, rope_index_fn(model)
