"""`qvl data`: synthetic datasets, validation, packing and grounding conversion."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.main import friendly

app = typer.Typer(help="Datasets: synthesise, check, pack, convert boxes.", no_args_is_help=True)
synth_app = typer.Typer(help="Synthetic datasets in the official fine-tuning format.", no_args_is_help=True)
app.add_typer(synth_app, name="synth")


@synth_app.command("shapes")
@friendly
def synth_shapes(out: Path = typer.Option(..., help="Folder to create."),
                 n: int = typer.Option(2000, help="Number of image samples (train + val)."),
                 val_fraction: float = typer.Option(0.1, help="Fraction of samples in the val split."),
                 videos: int = typer.Option(8, help="Number of short synthetic videos (mp4)."),
                 seed: int = typer.Option(0)):
    """Coloured shapes on noisy backgrounds: colour, shape, count and grounding (bbox_2d) questions."""
    from qvl.data.synth import make_shapes

    summary = make_shapes(out, n=n, val_fraction=val_fraction, n_videos=videos, seed=seed)
    typer.echo(str(summary))
