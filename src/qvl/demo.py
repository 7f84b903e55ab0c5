"""`qvl demo`: the whole fine-tuning loop offline on a CPU in a few minutes.

1. build the tiny Qwen3-VL (0.6 M parameters, RANDOM weights: it knows nothing yet),
2. make the synthetic shapes dataset (images with known answers),
3. score the untrained model on held-out questions (near chance),
4. train it with exactly what `qvl train examples/tiny_cpu.yaml` runs,
5. score it again and print base vs tuned, plus the commands to serve it and to run the same
   config on a real checkpoint (Qwen/Qwen3-VL-2B-Instruct).

The demo task is the short-answer part of the shapes data (colour and shape questions, one
round): answers are single words, so exact match is a fair score and a 0.6 M-parameter model can
learn it. Grounding and counting need a real model; the same config runs them on one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_TYPES = ("What colour is the", "What shape is the")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _short_answer(row: dict) -> bool:
    conv = row.get("conversations", [])
    return len(conv) == 2 and "image" in row and any(t in conv[0]["value"] for t in DEMO_TYPES)


def _one_shape(row: dict, seed: int) -> bool:
    """Whether the sample's image holds a single shape (the synthetic generator is deterministic)."""
    from qvl.data.synth import make_image_sample

    index = int(Path(row["image"]).stem)
    return len(make_image_sample(seed, index)[0].shapes) == 1


def _subset(src: Path, dst: Path, limit: int | None = None, seed: int = 0) -> int:
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    keep = [r for r in rows if _short_answer(r) and _one_shape(r, seed)][:limit]
    dst.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return len(keep)


def score(model, processor, annotation: Path, budget=None, batch_size: int = 16, max_new_tokens: int = 6) -> dict:
    """Exact-match accuracy of greedy answers on ``annotation`` (one-round samples), by question type."""
    import torch

    from qvl.data.collate import collate
    from qvl.data.preprocess import encode
    from qvl.data.registry import read_annotations
    from qvl.data.samples import Sample, parse_sample
    from qvl.models.tokens import token_ids

    rows = read_annotations(annotation)
    items = []
    for i, raw in enumerate(rows):
        sample, _ = parse_sample(raw, i, annotation.parent, f"{annotation.name}:{i}")
        if sample is None:
            continue
        prompt = Sample(sample.messages[:-1], sample.index, sample.origin)
        items.append((encode(prompt, processor, budget, for_generation=True), sample.messages[-1].text.strip(),
                      "colour" if "colour" in sample.messages[-2].text else "shape"))
    ids = token_ids(processor.tokenizer)
    model.eval()
    hits, per = 0, {}
    with torch.no_grad():
        for b in range(0, len(items), batch_size):
            chunk = items[b:b + batch_size]
            batch = collate([e for e, _, _ in chunk], ids.pad, padding_side="left")
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=ids.pad,
                                 eos_token_id=[ids.im_end, ids.endoftext])
            texts = processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            for (_, ref, kind), text in zip(chunk, texts):
                ok = text.strip().lower() == ref.lower()
                hits += ok
                h, n = per.get(kind, (0, 0))
                per[kind] = (h + ok, n + 1)
    return {"accuracy": hits / max(len(items), 1), "n": len(items),
            "by_type": {k: h / n for k, (h, n) in per.items()}}


def run_demo(out: Path, n: int = 200, steps: int | None = None) -> dict:
    """Build, score, train, score. Returns the numbers it prints."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from qvl.models.build import build_tiny
    from qvl.models.load import load
    from qvl.train.config import load_config
    from qvl.train.loop import train

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _say("qvl demo: fine-tune a Qwen3-VL end to end on this CPU, offline.")
    _say("NOTE: the tiny model (0.6 M parameters) starts from RANDOM weights. It learns the demo task from")
    _say("      scratch; it is a check that the pipeline works, not a useful model.\n")

    model_dir = out / "tiny-model"
    if not (model_dir / "config.json").is_file():
        built = build_tiny(model_dir)
        _say(f"[1/5] built the tiny model: {built.num_params:,} params in {model_dir}")
    else:
        _say(f"[1/5] tiny model: {model_dir} (reused)")

    data = out / "shapes"
    if not (data / "datasets.yaml").is_file():
        try:
            from qvl.data.synth import make_shapes
        except ImportError as e:
            _say(f"cannot make the shapes dataset: qvl.data.synth is missing ({e}); stopping here.")
            return {}
        summary = make_shapes(data, n=max(n, 50) * 8, val_fraction=0.2, n_videos=0, seed=0)
        _say(f"[2/5] made the synthetic shapes dataset in {data} ({summary.seconds:.1f} s)")
    else:
        _say(f"[2/5] shapes dataset: {data} (reused)")
    n_train = _subset(data / "train.jsonl", data / "demo_train.jsonl", limit=n)
    n_val = _subset(data / "val.jsonl", data / "demo_val.jsonl", limit=100)
    (data / "demo.yaml").write_text("demo_train:\n  annotation_path: demo_train.jsonl\n  data_path: .\n"
                                    "demo_val:\n  annotation_path: demo_val.jsonl\n  data_path: .\n")
    _say(f"      demo task: colour / shape questions, {n_train} train and {n_val} held-out samples")

    overrides = {"model_name_or_path": str(model_dir), "dataset_registry": str(data / "demo.yaml"),
                 "dataset_use": "demo_train", "output_dir": str(out / "run"), "resume": False}
    if steps is not None:
        overrides["max_steps"] = steps
    config_file = EXAMPLE if EXAMPLE.is_file() else None
    cfg = load_config(config_file, overrides) if config_file else None
    if cfg is None:
        _say(f"examples/tiny_cpu.yaml not found at {EXAMPLE}; cannot train.")
        return {}
    budget = cfg.vision_budget()

    torch.manual_seed(0)
    base, processor = load(model_dir)
    before = _evaluate(base, processor, data / "demo_val.jsonl", budget)
    _say(f"[3/5] untrained model on the held-out split: accuracy {before['accuracy']:.2f} ({before['n']} questions)")
    del base

    _say(f"[4/5] training: qvl train {config_file} " + " ".join(f"{k}={v}" for k, v in overrides.items()))
    t_train = time.perf_counter()
    result = train(cfg, log=lambda m: _say("      " + m.replace("\n", "\n      ")))
    train_s = time.perf_counter() - t_train

    tuned, processor = load(cfg.output_dir)
    after = _evaluate(tuned, processor, data / "demo_val.jsonl", budget)
    _say(f"[5/5] tuned model on the held-out split: accuracy {after['accuracy']:.2f}\n")

    chance = 0.5 * (1 / 6) + 0.5 * (1 / 3)
    _say(f"{'model':<26}{'accuracy':>10}{'colour':>9}{'shape':>9}")
    for name, r in (("tiny, random init (base)", before), ("tiny, fine-tuned", after)):
        bt = r["by_type"]
        _say(f"{name:<26}{r['accuracy']:>10.2f}{bt.get('colour', 0):>9.2f}{bt.get('shape', 0):>9.2f}")
    _say(f"{'chance (6 colours / 3 shapes)':<26}{chance:>10.2f}{1 / 6:>9.2f}{1 / 3:>9.2f}")
    _say(f"\ntraining: {result.steps} steps in {train_s:.0f} s, final loss {result.losses[-1]:.3f}"
         if result.losses else "")
    _say(f"total demo time: {time.perf_counter() - t0:.0f} s\n")
    _say("serve the result (OpenAI-compatible API):")
    _say(f"  qvl serve --model {cfg.output_dir}")
    _say("the same config on a real checkpoint (GPU; downloads ~4 GB once):")
    _say(f"  qvl train examples/tiny_cpu.yaml model_name_or_path=Qwen/Qwen3-VL-2B-Instruct "
         f"dataset_registry={data / 'datasets.yaml'} dataset_use=shapes_train bf16=true learning_rate=1e-5 "
         f"max_steps=-1 num_train_epochs=1 output_dir=runs/shapes-2b")
    return {"before": before, "after": after, "train_s": train_s, "total_s": time.perf_counter() - t0,
            "steps": result.steps}


def _evaluate(model, processor, annotation: Path, budget) -> dict:
    """`qvl.eval.evaluate` when it exists, else the demo's own exact-match score."""
    return score(model, processor, annotation, budget)
