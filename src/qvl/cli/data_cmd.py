"""`qvl data`: synthetic datasets, validation, packing and grounding conversion."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.common import friendly

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


@app.command("check")
@friendly
def check(dataset: str = typer.Argument(..., help="Registry name(s) with optional %X, or a .json/.jsonl file."),
          registry: Path = typer.Option(None, help="Dataset registry YAML (default: ./datasets.yaml or $QVL_DATASETS)."),
          model: str = typer.Option(None, help="Checkpoint whose processor counts tokens (default: the tiny model)."),
          max_length: int = typer.Option(8192, help="model_max_length to check against (0: no limit)."),
          min_pixels: int = typer.Option(None), max_pixels: int = typer.Option(None),
          video_fps: float = typer.Option(None), video_min_frames: int = typer.Option(None),
          video_max_frames: int = typer.Option(None), video_min_pixels: int = typer.Option(None),
          video_max_pixels: int = typer.Option(None),
          workers: int = typer.Option(None, help="Worker processes (default: all cores)."),
          timeout: float = typer.Option(60.0, help="Seconds allowed to decode one sample's media."),
          write_valid: Path = typer.Option(None, help="Write the valid records here (JSONL)."),
          write_problems: Path = typer.Option(None, help="Write bad records with their problems here (JSONL)."),
          no_cache: bool = typer.Option(False, help="Ignore and do not update the result cache."),
          seed: int = typer.Option(42, help="Seed for %X sampling (same as training's)."),
          json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON.")):
    """Validate a dataset: media decode, tags match media, roles, exact token lengths, bbox ranges."""
    import dataclasses
    import json

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    from rich.table import Table

    from qvl.config.vision import VisionBudget
    from qvl.data.check import check_records, summarize
    from qvl.data.registry import load_mixture, load_registry, parse_use, registry_path
    from qvl.utils.fs import atomic_write_jsonl, refuse_same_file

    names = [n for n, _ in parse_use(dataset)]
    reg = None
    if registry is not None or registry_path().is_file() or not all(n.endswith((".json", ".jsonl")) for n in names):
        reg = load_registry(registry)
    records = load_mixture(dataset, reg, seed=seed)
    inputs = [Path(n) for n in names if n.endswith((".json", ".jsonl"))] + (
        [reg[n].annotation_path for n in names if reg and n in reg])
    for out in (write_valid, write_problems):
        if out is not None:
            refuse_same_file(out, *inputs)

    overrides = {k: v for k, v in dict(min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                                       video_min_frames=video_min_frames, video_max_frames=video_max_frames,
                                       video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels).items()
                 if v is not None}
    try:
        budget = dataclasses.replace(VisionBudget(), **overrides)
    except ValueError as e:
        from qvl.errors import QvlError
        raise QvlError(str(e), where="budget flags") from None
    console = Console(stderr=True)
    if model is None:
        from qvl.models.build import default_tiny_dir

        model = str(default_tiny_dir())
        console.print("[yellow]no --model: counting tokens with the tiny model's tokenizer; pass the checkpoint you "
                      "will train for exact lengths[/yellow]")
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("checking", total=len(records))
        report = check_records(records, model, budget, max_length or None, workers, timeout,
                               use_cache=not no_cache, progress=lambda n: bar.update(task, completed=n))
    summary = summarize(report)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        table = Table(title=f"qvl data check {dataset}")
        table.add_column("", justify="left")
        table.add_column("value", justify="right")
        for k, v in summary.items():
            table.add_row(k.replace("_", " "), "-" if v is None else f"{v:,}" if isinstance(v, int) else str(v))
        Console().print(table)
    for rec, problem in report.problems():
        typer.echo(f"{rec.origin} (sample {problem.index}) {problem.field}: {problem.what} -> {problem.fix}")
    if write_valid is not None:
        atomic_write_jsonl(write_valid, (report.records[r.index].raw for r in report.results if not r.problems))
        typer.echo(f"wrote {summary['valid']} valid records to {write_valid}")
        roots = {str(r.data_path) for r in report.records}
        if roots != {str(write_valid.resolve().parent)}:
            typer.echo(f"note: media paths in it are relative to {', '.join(sorted(roots))}; register it with that "
                       "data_path")
    if write_problems is not None:
        atomic_write_jsonl(write_problems, ({"origin": report.records[r.index].origin, "index": r.index,
                                             "problems": [dataclasses.asdict(p) for p in r.problems],
                                             "record": report.records[r.index].raw} for r in report.bad))
        typer.echo(f"wrote {len(report.bad)} bad records to {write_problems}")
    if not report.ok:
        raise typer.Exit(1)


def _register_optional() -> None:
    from qvl.cli import bbox_cmd

    bbox_cmd.register(app)


_register_optional()
