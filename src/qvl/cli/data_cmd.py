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


def _records(dataset: str, registry: Path | None, seed: int):
    """(records, annotation files) for a registry name list or a file path."""
    from qvl.data.registry import load_mixture, load_registry, parse_use, registry_path

    names = [n for n, _ in parse_use(dataset)]
    reg = None
    if registry is not None or registry_path().is_file() or not all(n.endswith((".json", ".jsonl")) for n in names):
        reg = load_registry(registry)
    records = load_mixture(dataset, reg, seed=seed)
    inputs = [Path(n) for n in names if n.endswith((".json", ".jsonl"))] + (
        [reg[n].annotation_path for n in names if reg and n in reg])
    return records, inputs


def _budget(**flags):
    import dataclasses

    from qvl.config.vision import VisionBudget
    from qvl.errors import QvlError

    try:
        return dataclasses.replace(VisionBudget(), **{k: v for k, v in flags.items() if v is not None})
    except ValueError as e:
        raise QvlError(str(e), where="budget flags") from None


def _run_check(records, model, budget, max_length, workers, timeout, use_cache):
    """check_records with a progress bar; without --model, the tiny tokenizer counts (and we say so)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from qvl.data.check import check_records

    console = Console(stderr=True)
    if model is None:
        from qvl.models.build import default_tiny_dir

        model = str(default_tiny_dir())
        console.print("[yellow]no --model: counting tokens with the tiny model's tokenizer; pass the checkpoint you "
                      "will train for exact lengths[/yellow]")
    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task("checking", total=len(records))
        return check_records(records, model, budget, max_length, workers, timeout, use_cache=use_cache,
                             progress=lambda n: bar.update(task, completed=n))


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
    from rich.table import Table

    from qvl.data.check import summarize
    from qvl.utils.fs import atomic_write_jsonl, refuse_same_file

    records, inputs = _records(dataset, registry, seed)
    for out in (write_valid, write_problems):
        if out is not None:
            refuse_same_file(out, *inputs)
    budget = _budget(min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                     video_min_frames=video_min_frames, video_max_frames=video_max_frames,
                     video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels)
    report = _run_check(records, model, budget, max_length or None, workers, timeout, not no_cache)
    summary = summarize(report)
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        table = Table(title="qvl data check", caption=dataset)
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



@app.command("pack")
@friendly
def pack(dataset: str = typer.Argument(..., help="Registry name(s) with optional %X, or a .json/.jsonl file."),
         max_length: int = typer.Option(..., help="Tokens per pack (the training model_max_length)."),
         out: Path = typer.Option(..., help="Packed .jsonl to write (each line: a list of samples)."),
         registry: Path = typer.Option(None, help="Dataset registry YAML."),
         model: str = typer.Option(None, help="Checkpoint whose processor counts tokens (default: the tiny model)."),
         min_pixels: int = typer.Option(None), max_pixels: int = typer.Option(None),
         video_fps: float = typer.Option(None), video_min_frames: int = typer.Option(None),
         video_max_frames: int = typer.Option(None), video_min_pixels: int = typer.Option(None),
         video_max_pixels: int = typer.Option(None),
         workers: int = typer.Option(None), timeout: float = typer.Option(60.0),
         overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
         seed: int = typer.Option(42)):
    """Bin the whole dataset into packs of at most --max-length tokens (best-fit decreasing, exact counts)."""
    import json

    from qvl.data.packing import best_fit_decreasing
    from qvl.errors import QvlError
    from qvl.utils.fs import atomic_write_text, refuse_same_file

    records, inputs = _records(dataset, registry, seed)
    refuse_same_file(out, *inputs)
    if out.exists() and not overwrite:
        raise QvlError(f"{out} exists", fix="choose another --out or pass --overwrite")
    budget = _budget(min_pixels=min_pixels, max_pixels=max_pixels, video_fps=video_fps,
                     video_min_frames=video_min_frames, video_max_frames=video_max_frames,
                     video_min_pixels=video_min_pixels, video_max_pixels=video_max_pixels)
    report = _run_check(records, model, budget, None, workers, timeout, True)
    usable = [r for r in report.results if not r.problems and r.length is not None]
    plan = best_fit_decreasing([r.length for r in usable], max_length)
    lines = []
    for group in plan.packs:
        samples = []
        for k in sorted(group):
            rec = report.records[usable[k].index]
            samples.append({**rec.raw, "data_path": str(Path(rec.data_path).resolve())})
        lines.append(json.dumps(samples, ensure_ascii=False))
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    packed = sum(len(p) for p in plan.packs)
    typer.echo(f"{len(records)} samples -> {len(plan.packs)} packs of <= {max_length:,} tokens; "
               f"fill ratio {plan.fill_ratio:.1%}; wrote {out}")
    if plan.too_long:
        typer.echo(f"{len(plan.too_long)} sample(s) longer than {max_length:,} tokens were left out (not cut):")
        for k in plan.too_long[:20]:
            r = usable[k]
            typer.echo(f"  {report.records[r.index].origin}: {r.length:,} tokens")
    if report.bad:
        typer.echo(f"{len(report.bad)} invalid sample(s) left out; see `qvl data check {dataset}`")
    typer.echo(f"packed {packed} of {len(records)} samples; register {out.name} and train with data_packing: true")


def _register_optional() -> None:
    from qvl.cli import bbox_cmd

    bbox_cmd.register(app)


_register_optional()
