"""Which settings CUDA graphs of the decoder stack (``cuda_graphs``, :mod:`qvl.train.graphs`) train with on this GPU's
torch: a tiny Qwen3-VL trained a few steps per variant, each in its own process (a crash ends only its variant).

    python bench/experiments/cuda_graphs_probe.py                 # every variant
    python bench/experiments/cuda_graphs_probe.py graphs-layer    # one

Variants: ``plain`` (compiled whole layers, no graphs, whole-layer recompute: the reference losses),
``graphs-nockpt`` (graphs, nothing recomputed), ``graphs-layer`` / ``graphs-mlp`` (graphs with the recompute inside
the compiled layer, whole or MLP only), ``graphs-eager`` (graphs over eager layers, transformers' checkpointing) and
``padded-nograph`` (what the graphs need, padded rows and the row length as the attention bound, without graphs).
Every variant runs at once. Prints each variant's losses, what the graphs replayed and how it ended.

On 2026-11-27 this ran against inductor's CUDA graph trees (``mode="reduce-overhead"``): every graph variant crashed
(segfault in the first backward) on torch 2.11 (results/cuda_graphs_probe.txt); qvl records its own graphs instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "plain": dict(cuda_graphs=False, gradient_checkpointing=True, gradient_checkpointing_scope="layer"),
    "graphs-nockpt": dict(cuda_graphs=True, gradient_checkpointing=False),
    "graphs-layer": dict(cuda_graphs=True, gradient_checkpointing=True, gradient_checkpointing_scope="layer"),
    "graphs-mlp": dict(cuda_graphs=True, gradient_checkpointing=True, gradient_checkpointing_scope="mlp"),
    "graphs-eager": dict(cuda_graphs=True, gradient_checkpointing=True, compile_layers=False),
    # what the graphs need, without the graphs: padded rows and the row length as the attention bound
    "padded-nograph": dict(cuda_graphs=True, gradient_checkpointing=False, graphs=False),
}


TIMEOUT_S = 300  # all variants run at once (a tiny model's compilation alone took over 100 s on an H100)


def run_variant(name: str, work: Path) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "train"))
    from train_helpers import make_colour_data

    from qvl.train.config import build_config
    from qvl.train.loop import train

    settings = dict(VARIANTS[name])
    if not settings.pop("graphs", True):  # pad rows as for graphs, train without recording any
        from qvl.train.graphs import DecoderGraphs

        DecoderGraphs.install = lambda self: self
    data = make_colour_data(work / "data", 24, seed=6, text_only=6)
    cfg = build_config(dict(model_name_or_path=str(work / "tiny"), dataset_use=data, output_dir=str(work / name),
                            data_flatten=True, tune_mm_llm=False, tune_mm_mlp=False, lora_enable=True, bf16=True,
                            per_device_train_batch_size=4, max_steps=6, save_strategy="no", report_to="none",
                            gradient_checkpointing_ratio=1.0, cuda_graphs_row_multiple=64,
                            learning_rate=1e-3, lr_scheduler_type="constant", seed=0, max_pixels=64 * 64,
                            min_pixels=64 * 64, **settings))
    said: list[str] = []
    result = train(cfg, log=said.append)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    return {"losses": [round(x, 4) for x in result.losses],
            "cuda_graphs": [line for line in said if line.startswith("cuda_graphs")],
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--child":
        name, work = argv[1].split("@", 1)
        print("RESULT " + json.dumps(run_variant(name, Path(work))), flush=True)
        return
    names = argv or list(VARIANTS)
    work = Path(tempfile.mkdtemp(prefix="qvl_graphs_probe_"))
    from qvl.models.build import build_tiny

    build_tiny(work / "tiny")
    results = {}
    # every variant at once (tiny models share the GPU): each in its own process, so a crash ends only its variant
    procs = {name: subprocess.Popen([sys.executable, "-X", "faulthandler", __file__, "--child", f"{name}@{work}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=dict(os.environ)) for name in names}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            results[name] = {"rc": "timeout", "stderr_tail": [f"over {TIMEOUT_S} s"]}
            print(name, json.dumps(results[name]), flush=True)
            continue
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line:
            results[name] = json.loads(line[len("RESULT "):])
        else:
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warning" not in ln]
            crash = next((i for i, ln in enumerate(lines) if ln.startswith("Current thread")), None)
            tail = lines[crash:crash + 14] if crash is not None else lines[-12:]  # the crashing thread's stack
            results[name] = {"rc": proc.returncode, "stderr_tail": tail}
        print(name, json.dumps(results[name], indent=None)[:1500], flush=True)
    ref = results.get("plain", {}).get("losses")
    for name, res in results.items():
        if ref and res.get("losses"):
            worst = max(abs(a - b) for a, b in zip(res["losses"], ref))
            print(f"{name}: max |loss - plain| = {worst:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
