"""`qvl model`: build offline checkpoints (tiny test model, official architectures with random weights) and show size facts."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.common import friendly

app = typer.Typer(help="Build and inspect Qwen3-VL checkpoints offline.", no_args_is_help=True)


@app.command("tiny")
@friendly
def tiny(out: Path = typer.Option(..., help="Folder to create (must not exist or be empty)."),
         seed: int = typer.Option(0, help="Seed for the random weights."),
         variant: str = typer.Option("default", help="default (0.6 M params, the tests'), demo (the wider one "
                                                     "`qvl demo` trains) or moe (mixture of experts, qwen3_vl_moe)")):
    """Build a tiny random-weight Qwen3-VL for the demo and the tests. Deterministic, offline."""
    from qvl.models.build import build_tiny

    built = build_tiny(out, seed=seed, variant=variant)
    typer.echo(f"built tiny Qwen3-VL{' MoE' if variant == 'moe' else ''} ({built.num_params:,} params) in {built.path}")


@app.command("random")
@friendly
def random(size: str = typer.Option(..., help="2B, 4B, 8B, 32B or 30B-A3B."),
           out: Path = typer.Option(..., help="Folder to create."),
           dtype: str = typer.Option("bfloat16", help="bfloat16 or float32."),
           device: str = typer.Option(None, help="Where to initialise (default: cuda if available, else cpu)."),
           seed: int = typer.Option(0)):
    """Build an official Qwen3-VL architecture with random weights and official token ids."""
    import torch

    from qvl.models.build import build_random
    from qvl.models.sizes import get_size

    facts = get_size(size)
    gib = facts.params_total * (2 if dtype == "bfloat16" else 4) / 2**30
    typer.echo(f"building Qwen3-VL-{facts.name} with random weights ({facts.params_total / 1e9:.2f} B params, "
               f"{gib:.1f} GiB in {dtype}) ...")
    built = build_random(facts.name, out, dtype=getattr(torch, dtype), seed=seed, device=device)
    typer.echo(f"built {built.path} ({built.num_params:,} params)")


@app.command("sizes")
def sizes():
    """Print the facts of every Qwen3-VL size."""
    from rich.console import Console
    from rich.table import Table

    from qvl.models.sizes import SIZES

    t = Table(title="Qwen3-VL sizes (official configs; params measured on the meta device)")
    for col in ("size", "params", "vision", "LLM layers", "hidden", "heads/kv", "tied", "bf16 weights",
                "KV / token"):
        t.add_column(col, justify="right")
    for s in SIZES.values():
        total = f"{s.params_total / 1e9:.2f} B" + (f" ({s.params_active / 1e9:.1f} B active)" if s.params_active else "")
        t.add_row(s.name, total, f"{s.params_vision / 1e6:.0f} M", str(s.text_layers), str(s.text_hidden),
                  f"{s.text_heads}/{s.text_kv_heads}", "yes" if s.tie_word_embeddings else "no",
                  f"{s.params_total * 2 / 2**30:.1f} GiB", f"{s.kv_bytes_per_token() / 1024:.0f} KiB")
    Console().print(t)
