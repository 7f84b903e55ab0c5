"""`qvl demo`: the whole loop offline on a CPU, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.common import friendly


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @friendly
    def demo(out: Path = typer.Option(Path("demo_out"), help="Working folder (reused if it exists)."),
             n: int = typer.Option(4500, help="Synthetic training images."),
             steps: int = typer.Option(None, help="Training steps (default: the example config's max_steps).")):
        """Build the tiny model (random weights) and synthetic data, score it, train it with `qvl train`'s
        code path, score it again and print base vs tuned (a few minutes on a CPU, offline)."""
        from qvl.demo import run_demo

        run_demo(out, n_train=n, steps=steps)
