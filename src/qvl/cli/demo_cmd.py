"""`qvl demo`: the whole loop offline on a CPU, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.common import friendly


def register(app: typer.Typer) -> None:
    @app.command("demo")
    @friendly
    def demo(out: Path = typer.Option(Path("demo_out"), help="Working folder (reused if it exists)."),
             n: int = typer.Option(200, help="Synthetic training samples.")):
        """Build the tiny model, a synthetic dataset, check it, and (when available) train and evaluate."""
        from qvl.demo import run_demo

        run_demo(out, n=n)
