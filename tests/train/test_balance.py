"""balance_tokens: each micro-batch position's global chunk split between ranks by estimated tokens.

The step's samples (and so its loss) stay those of the strided split; only which rank runs which
changes, so the busiest rank has fewer tokens. The estimate matches ``count_tokens`` for text and
images and is close for videos; a 2-process gloo run with packed rows gives the 1-process losses."""

from __future__ import annotations

import pickle
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from train_helpers import make_colour_data, run_two_ranks

from qvl.data.lengths import FALLBACK_TOKENS, TokenEstimate, sample_tokens
from qvl.train.config import build_config, from_argv
from qvl.train.batches import Plan, split_by_tokens
from qvl.train.loop import Dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
from helpers import write_image, write_video

BASE = ["model_name_or_path=m", "dataset_use=d", "tune_mm_llm=true", "seed=5"]


def plans(n: int, world: int, lengths=None, **kw) -> list[Plan]:
    cfg = from_argv(BASE + ["data_flatten=true"] + [f"{k}={v}" for k, v in kw.items()])
    return [Plan(n, cfg, Dist(r, world, r), lengths=lengths) for r in range(world)]


def shares(ps: list[Plan], j: int) -> list[list[int]]:
    return [p.micro_batch(0, j, p.epoch_order(0)) for p in ps]


def max_tokens(ps: list[Plan], lengths, j: int) -> int:
    return max(sum(lengths(i) for i in share) for share in shares(ps, j))


def test_default_is_on_for_packed_rows_on_several_ranks():
    assert from_argv(BASE).balances_tokens(2)  # packed rows are the default
    assert not from_argv(BASE + ["data_flatten=false"]).balances_tokens(2)  # padded batches: the strided split
    assert from_argv(BASE + ["data_flatten=true"]).balances_tokens(2)
    assert from_argv(BASE + ["data_packing=true"]).balances_tokens(4)
    assert not from_argv(BASE + ["data_flatten=true"]).balances_tokens(1)
    assert not from_argv(BASE + ["data_flatten=true", "balance_tokens=false"]).balances_tokens(2)
    assert from_argv(BASE + ["data_flatten=false", "balance_tokens=true"]).balances_tokens(2)
    assert not Plan(10, from_argv(BASE + ["data_flatten=true"]), Dist(0, 2, 0)).balanced  # no lengths: strided


def test_balanced_ranks_share_exactly_the_strided_chunk():
    rng = random.Random(0)
    n, world, bs = 37, 3, 4  # 37 records on 3 ranks: the order is padded to 39
    lengths = {i: rng.randint(29, 1800) for i in range(n)}.__getitem__
    balanced, strided = plans(n, world, lengths, per_device_train_batch_size=bs), plans(n, world, None,
                                                                                     per_device_train_batch_size=bs)
    assert all(p.balanced for p in balanced) and not any(p.balanced for p in strided)
    assert balanced[0].micro_per_epoch == 4
    changed = 0
    for j in range(balanced[0].micro_per_epoch):
        b, s = shares(balanced, j), shares(strided, j)
        assert Counter(i for share in b for i in share) == Counter(i for share in s for i in share)
        assert [len(x) for x in b] == [len(x) for x in s] and len(b[0]) == (bs if j < 3 else 1)
        assert shares(plans(n, world, lengths, per_device_train_batch_size=bs), j) == b  # deterministic (resume)
        changed += b != s
    assert changed  # balancing moved something
    same = {i: 7 for i in range(n)}.__getitem__  # equal lengths: exactly the strided split
    assert all(shares(plans(n, world, same, per_device_train_batch_size=bs), j) == shares(strided, j)
               for j in range(4))


@pytest.mark.parametrize("world", [2, 4])
def test_balancing_never_loses_to_strided(world):
    rng = random.Random(world)
    n = 400
    lengths = {i: rng.randint(29, 1800) for i in range(n)}.__getitem__  # the benchmark workload's range
    balanced, strided = plans(n, world, lengths, per_device_train_batch_size=2), plans(n, world, None,
                                                                                       per_device_train_batch_size=2)
    b = [max_tokens(balanced, lengths, j) for j in range(balanced[0].micro_per_epoch)]
    s = [max_tokens(strided, lengths, j) for j in range(strided[0].micro_per_epoch)]
    assert all(x <= y for x, y in zip(b, s))
    assert sum(b) < 0.9 * sum(s)  # the busiest rank waits noticeably less over the epoch


def test_a_constructed_case_is_strictly_better():
    # the chunk's even positions are long: strided puts them all on rank 0
    assert split_by_tokens([10, 1, 10, 1], 2) == [[0, 1], [2, 3]]
    n, world = 16, 2
    order = plans(n, world)[0].global_order(0)
    length = {i: 1000 if p % 2 == 0 else 10 for p, i in enumerate(order)}.__getitem__
    balanced, strided = plans(n, world, length, per_device_train_batch_size=4), plans(n, world, None,
                                                                                      per_device_train_batch_size=4)
    for j in range(2):
        assert max_tokens(strided, length, j) == 4000
        assert max_tokens(balanced, length, j) == 2020


def test_estimate_matches_count_tokens(tiny_processor, tmp_path):
    from qvl.config.vision import VisionBudget
    from qvl.data.preprocess import count_tokens
    from qvl.data.samples import parse_sample

    budget = VisionBudget(min_pixels=32 * 32, max_pixels=128 * 128, video_max_pixels=4 * 1024 * 832)
    write_image(tmp_path / "wide.png", 300, 120)
    write_image(tmp_path / "small.png", 40, 40)
    write_video(tmp_path / "v.mp4", frames=24, fps=8, w=128, h=96)
    for k in range(6):
        write_image(tmp_path / f"f{k}.png", 96, 64)
    for k in range(4):  # 832 tokens a frame pair: above the checkpoint's per-frame cap (768), which the budget lifts
        write_image(tmp_path / f"big{k}.png", 1024, 832)

    def turn(prompt, answer="red"):
        return [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}]

    exact = [{"conversations": turn("Say yes. " * 40, "yes " * 20)},
             {"image": "wide.png", "conversations": turn("<image>\nWhat colour?")},
             {"image": ["wide.png", "small.png"], "conversations": turn("<image> and <image>: the same?", "no")}]
    videos = [{"video": "v.mp4", "conversations": turn("<video>\nWhat happens?", "it brightens")},
              {"video": [[f"f{k}.png" for k in range(6)]], "conversations": turn("<video>\nAnd here?")}]
    large = {"video": [[f"big{k}.png" for k in range(4)]], "sample_fps": 2, "conversations": turn("<video>\nWhy?")}
    videos.append(large)
    for raw in exact + videos:
        sample = parse_sample(raw, 0, tmp_path, "")[0]
        true = count_tokens(sample, tiny_processor, budget)
        est = sample_tokens(raw, tiny_processor, budget, tmp_path)
        if raw in exact:
            assert est == true, raw
        elif raw is large:  # frames the budget keeps whole: no per-frame cap in the estimate either
            assert abs(est - true) <= 0.02 * true, (est, true)
        else:  # frames and tokens per frame pair exact; the timestamps' text is estimated
            assert 0.8 * true <= est <= 1.25 * true, (est, true)
    broken = {"image": "missing.png", "conversations": turn("<image>\nWhat?")}
    assert sample_tokens(broken, tiny_processor, budget, tmp_path) == FALLBACK_TOKENS  # the encoder reports it later
    assert sample_tokens({"conversations": []}, tiny_processor, budget, tmp_path) == FALLBACK_TOKENS

    from qvl.data.registry import RawRecord

    records = [RawRecord(exact[1], tmp_path, "x", 0), RawRecord([exact[0], exact[2]], tmp_path, "x", 1)]  # a pack
    est = TokenEstimate(records, tiny_processor, budget)
    assert est(1) == sum(sample_tokens(r, tiny_processor, budget, tmp_path) for r in (exact[0], exact[2]))
    again = pickle.loads(pickle.dumps(est))  # DataLoader workers get their own copy
    assert [again(0), again(1)] == [est(0), est(1)]


@pytest.mark.parametrize("extra", [{}, {"gradient_checkpointing": True, "gradient_checkpointing_scope": "mlp",
                                       "lora_enable": True, "lora_r": 8, "tune_mm_llm": False}], ids=["full", "lora-mlp"])
def test_two_ranks_balanced_match_one_rank(tiny_model_dir, tmp_path, extra):
    """data_flatten on 2 gloo ranks (DDP): balanced micro-batches (which differ from the strided ones here) give
    the 1-process losses of the same global batches; also LoRA with selective recompute (layers swapped to their
    checkpoint-inside class under DDP)."""
    from qvl.data.registry import load_mixture
    from qvl.models.load import load_processor
    from qvl.train.loop import train
    from qvl.train.track import read_metrics

    data = make_colour_data(tmp_path / "mixed", 8, text_only=8)  # images 33 tokens, texts 16
    values = {"model_name_or_path": str(tiny_model_dir), "dataset_use": data, "tune_mm_llm": True,
              "tune_mm_mlp": True, "learning_rate": 1e-3, "per_device_train_batch_size": 4, "data_flatten": True,
              "save_strategy": "no", "report_to": "none", "seed": 0, "lr_scheduler_type": "constant",
              "max_pixels": 4096, "min_pixels": 4096, "max_steps": 2, **extra}
    cfg = build_config(values)
    records = load_mixture(data, None, seed=0)
    est = TokenEstimate(records, load_processor(str(tiny_model_dir)), cfg.vision_budget())
    two = [Plan(len(records), cfg, Dist(r, 2, r), lengths=est) for r in range(2)]
    strided = [Plan(len(records), cfg, Dist(r, 2, r)) for r in range(2)]
    assert two[0].balanced and any(shares(two, j) != shares(strided, j) for j in range(2))

    one = train(build_config({**values, "gradient_accumulation_steps": 2, "output_dir": str(tmp_path / "one")}),
                log=lambda *_: None)
    out = tmp_path / "two"
    p = run_two_ranks([f"{k}={v}" for k, v in values.items()] + [f"output_dir={out}"], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "balance_tokens" in p.stdout
    assert ("keep their attention half" in p.stdout) == bool(extra)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert losses == pytest.approx(one.losses, rel=1e-4, abs=1e-4)
