"""`qvl demo`: the whole fine-tuning loop offline on a CPU in a few minutes.

1. build the tiny Qwen3-VL, demo variant (~2 M parameters, RANDOM weights: it knows nothing yet),
2. make the demo's synthetic shapes data (one shape per image, drawn by ``qvl.data.synth``),
3. score the untrained model on the held-out split (near chance),
4. train it with exactly what ``qvl train examples/tiny_cpu.yaml`` runs (``qvl.train.loop.train``),
5. score it again and print base vs tuned, plus the commands to serve it and to run the same
   config on a real checkpoint (Qwen/Qwen3-VL-2B-Instruct).

The demo task: "What colour is the <shape>?" (6 colours) and "What shape is the <colour>
object?" (circle / square / triangle) about images holding a single shape, the phrasing of the
shapes dataset (``qvl data synth``). Scores come from ``qvl.eval.evaluate``: closed-set accuracy
(the most likely of the 6 colours / 3 shapes, so a random model sits at chance instead of at 0)
and greedy exact match (what generation writes). Grounding and counting need a real model; the
same config runs them on one.

Everything lives in the working folder (``demo_out``): running the demo again reuses the model
and data when they match and replaces the previous run; nothing outside the folder is touched.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny_cpu.yaml"
MARKER = ".qvl-demo"  # a folder holding this file is the demo's: it may replace its own subfolders
DATA_VERSION = 1  # bump when the generator below changes: the data is rebuilt instead of reused


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------------
# The demo data
# --------------------------------------------------------------------------------------------------

def _demo_image(seed: int, i: int, side: int, lo: float, hi: float):
    """(image, kind, colour, rng) of demo image ``i``: one shape (``lo``-``hi`` of the side) on the shapes background."""
    import numpy as np
    from PIL import Image

    from qvl.data.synth import COLOURS, SHAPES, _background, draw_shape

    rng = np.random.default_rng([seed, 7, i])
    image = Image.fromarray(_background(rng, side, side))
    size = int(rng.integers(int(side * lo), int(side * hi) + 1))
    x, y = (int(v) for v in rng.integers(0, side - size + 1, size=2))
    kind, colour = SHAPES[i % len(SHAPES)], list(COLOURS)[int(rng.integers(len(COLOURS)))]
    draw_shape(image, kind, colour, x, y, size)
    return image, kind, colour, rng


def _qa(kind: str, colour: str) -> dict:
    """The two questions of the shapes dataset about a single-shape image (qvl.data.synth.ask_*)."""
    return {"colour": (f"What colour is the {kind}?", colour), "shape": (f"What shape is the {colour} object?", kind)}


def make_demo_data(out: Path, n_train: int, n_val: int, seed: int = 0, side: int = 128, lo: float = 0.6,
                   hi: float = 0.75, colour_fraction: float = 0.25) -> dict:
    """Write the demo's data to ``out`` (official format + ``datasets.yaml``); returns its description.

    Train: every image gets the shape question, a ``colour_fraction`` of them the colour question
    too (colour is learnt in a few steps, shape needs the samples). Val (held out, other images):
    both questions for every image. Shape kinds are balanced; colours uniform.
    """
    from qvl.data.synth import JPEG
    from qvl.utils.fs import atomic_dir

    meta = {"version": DATA_VERSION, "n_train": n_train, "n_val": n_val, "seed": seed, "side": side, "lo": lo,
            "hi": hi, "colour_fraction": colour_fraction}
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()) == meta:
        return dict(meta, reused=True)
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "images").mkdir()
        rows: dict[str, list] = {"train": [], "val": []}
        for split, start, n in (("train", 0, n_train), ("val", 1_000_000, n_val)):
            for i in range(start, start + n):
                image, kind, colour, rng = _demo_image(seed, i, side, lo, hi)
                rel = f"images/{split}{i - start:05d}.jpg"
                image.save(tmp / rel, **JPEG)
                qa = _qa(kind, colour)
                kinds = ["colour", "shape"] if split == "val" or rng.random() < colour_fraction else ["shape"]
                for k in kinds:
                    q, a = qa[k]
                    rows[split].append({"image": rel, "conversations": [
                        {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
        for split, rs in rows.items():
            (tmp / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        (tmp / "datasets.yaml").write_text("shapes_demo_train:\n  annotation_path: train.jsonl\n  data_path: .\n"
                                           "shapes_demo_val:\n  annotation_path: val.jsonl\n  data_path: .\n")
        (tmp / "meta.json").write_text(json.dumps(meta))
    return dict(meta, reused=False)


# --------------------------------------------------------------------------------------------------
# Scoring (qvl.eval)
# --------------------------------------------------------------------------------------------------

def score(model, processor, records, budget, batch_size: int = 64) -> dict:
    """Closed-set accuracy per question type (6 colours / 3 shapes) and greedy exact match, via qvl.eval."""
    from qvl.data.synth import COLOURS, SHAPES
    from qvl.eval.run import evaluate

    by_type = {"colour": [r for r in records if "What colour" in r.raw["conversations"][0]["value"]],
               "shape": [r for r in records if "What shape" in r.raw["conversations"][0]["value"]]}
    out: dict = {"n": len(records)}
    for kind, choices in (("colour", list(COLOURS)), ("shape", list(SHAPES))):
        res = evaluate(model, processor, by_type[kind], name=kind, batch_size=batch_size, budget=budget,
                       choices=choices)
        out[kind] = res.summary["score"]
        out[f"{kind}_n"] = res.summary["n"]
    out["closed"] = (out["colour"] * out["colour_n"] + out["shape"] * out["shape_n"]) / max(len(records), 1)
    greedy = evaluate(model, processor, records, name="greedy", batch_size=batch_size, budget=budget,
                      max_new_tokens=4)
    out["greedy"] = greedy.summary.get("exact", 0.0)
    return out


# --------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------

def _own(out: Path) -> None:
    """Claim ``out`` for the demo, refusing a non-empty folder that the demo did not create."""
    from qvl.errors import QvlError

    if out.exists() and not out.is_dir():
        raise QvlError(f"{out} is a file, not a folder", fix="pass a folder as --out")
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise QvlError(f"{out} exists, is not empty and was not made by `qvl demo`",
                       fix="pass another --out (the demo only writes inside its own folder)")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `qvl demo`; its subfolders are rebuilt on each run\n")


def _tiny_model(model_dir: Path) -> tuple[str, int]:
    from qvl.models.build import TINY_DEMO_TEXT, build_tiny

    cfg = model_dir / "config.json"
    if cfg.is_file():
        text = json.loads(cfg.read_text()).get("text_config", {})
        if (text.get("hidden_size"), text.get("num_hidden_layers")) == (
                TINY_DEMO_TEXT["hidden_size"], TINY_DEMO_TEXT["num_hidden_layers"]):
            return "reused", 0
        shutil.rmtree(model_dir)  # the demo's own older model
    built = build_tiny(model_dir, variant="demo")
    return "built", built.num_params


def run_demo(out: Path, n_train: int = 4500, n_val: int = 100, steps: int | None = None,
             overrides: dict | None = None) -> dict:
    """Build, score, train, score, print the table. Returns the numbers it prints.

    ``n_train`` / ``n_val``: training and held-out images; ``steps`` and ``overrides`` change the
    training config (tests use them for a shortened run).
    """
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from qvl.data.registry import load_mixture, load_registry
    from qvl.models.load import load
    from qvl.train.config import load_config
    from qvl.train.loop import train

    t0 = time.perf_counter()
    out = Path(out)
    _own(out)
    _say("qvl demo: fine-tune a Qwen3-VL end to end on this CPU, offline.")
    _say("NOTE: the tiny model starts from RANDOM weights: it knows nothing about images or words. It learns")
    _say("      the demo task from scratch here; it checks that the pipeline works, it is not a useful model.\n")

    model_dir = out / "tiny-demo-model"
    how, n_params = _tiny_model(model_dir)
    if how == "built":
        _say(f"[1/5] built the tiny model (demo variant, random init): {n_params:,} params in {model_dir}")
    else:
        _say(f"[1/5] tiny model (demo variant, random init): {model_dir} (reused)")

    data = out / "shapes-demo"
    t_data = time.perf_counter()
    meta = make_demo_data(data, n_train, n_val)
    registry = load_registry(data / "datasets.yaml")
    n_rows = {s: len(load_mixture(f"shapes_demo_{s}", registry)) for s in ("train", "val")}
    _say(f"[2/5] synthetic shapes data in {data} ("
         f"{'reused' if meta['reused'] else f'made in {time.perf_counter() - t_data:.1f} s'}): one shape per "
         f"{meta['side']}x{meta['side']} image;")
    _say("      questions 'What colour is the <shape>?' (6 colours) and 'What shape is the <colour> object?'")
    _say(f"      (circle/square/triangle); {meta['n_train']} train images -> {n_rows['train']} questions, "
         f"{meta['n_val']} held-out images -> {n_rows['val']} questions")

    over = {"model_name_or_path": str(model_dir), "dataset_registry": str(data / "datasets.yaml"),
            "dataset_use": "shapes_demo_train", "output_dir": str(out / "run"), "resume": False}
    if steps is not None:
        over["max_steps"] = steps
    over.update(overrides or {})
    cfg = load_config(EXAMPLE, over)
    budget = cfg.vision_budget()  # score with the training budgets (the saved processor keeps the model's own)
    val = load_mixture("shapes_demo_val", registry)

    torch.manual_seed(0)
    base, processor = load(model_dir)
    t_eval = time.perf_counter()
    before = score(base, processor, val, budget)
    _say(f"[3/5] untrained model on the held-out split: closed-set accuracy {before['closed']:.2f}, greedy exact "
         f"match {before['greedy']:.2f} ({before['n']} questions, {time.perf_counter() - t_eval:.0f} s)")
    del base

    if (out / "run").exists():  # the demo's previous run: replaced, not archived (it would pile up)
        shutil.rmtree(out / "run")
    shown = {k: v for k, v in over.items() if k != "resume"}
    _say("[4/5] training: qvl train examples/tiny_cpu.yaml " + " ".join(f"{k}={v}" for k, v in shown.items()))
    t_train = time.perf_counter()
    result = train(cfg, log=lambda m: _say("      " + m.replace("\n", "\n      ")))
    train_s = time.perf_counter() - t_train

    tuned, processor = load(cfg.output_dir)
    t_eval = time.perf_counter()
    after = score(tuned, processor, val, budget)
    _say(f"[5/5] tuned model on the held-out split: closed-set accuracy {after['closed']:.2f}, greedy exact match "
         f"{after['greedy']:.2f} ({time.perf_counter() - t_eval:.0f} s)\n")

    _say(f"held-out split: {after['colour_n']} colour + {after['shape_n']} shape questions on {meta['n_val']} unseen "
         "images")
    _say(f"{'model':<30}{'colour':>8}{'shape':>8}{'both':>8}{'greedy exact':>14}")
    _say(f"{'':<30}{'(closed-set accuracy, qvl eval --choices)':>24}")
    _say(f"{'chance (1/6, 1/3)':<30}{1 / 6:>8.2f}{1 / 3:>8.2f}{(1 / 6 + 1 / 3) / 2:>8.2f}{'-':>14}")
    for name, r in (("tiny, random init (base)", before), ("tiny, fine-tuned", after)):
        _say(f"{name:<30}{r['colour']:>8.2f}{r['shape']:>8.2f}{r['closed']:>8.2f}{r['greedy']:>14.2f}")
    if result.losses:
        _say(f"\ntraining: {result.steps} steps in {train_s:.0f} s, final loss {result.losses[-1]:.3f}")
    total = time.perf_counter() - t0
    _say(f"total demo time: {total:.0f} s\n")
    _say("serve the result (OpenAI-compatible API + web chat):")
    _say(f"  qvl serve --model {cfg.output_dir}")
    _say("score it yourself (closed-set and greedy):")
    _say(f"  qvl eval {cfg.output_dir} --registry {data / 'datasets.yaml'} --data shapes_demo_val --choices auto")
    _say("the same config on a real checkpoint (GPU; downloads ~4 GB once), on the full shapes dataset:")
    _say("  qvl data synth shapes --out shapes")
    _say("  qvl train examples/tiny_cpu.yaml model_name_or_path=Qwen/Qwen3-VL-2B-Instruct "
         "dataset_registry=shapes/datasets.yaml dataset_use=shapes_train bf16=true learning_rate=1e-5 "
         "max_steps=-1 num_train_epochs=1 max_pixels=451584 min_pixels=12544 output_dir=runs/shapes-2b")
    return {"before": before, "after": after, "train_s": train_s, "total_s": total, "steps": result.steps,
            "output_dir": str(cfg.output_dir)}
