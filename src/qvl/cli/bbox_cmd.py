"""`qvl data bbox`: detection annotations (or legacy Qwen2.5-VL data) → Qwen3-VL grounding samples."""

from __future__ import annotations

from pathlib import Path

import typer

from qvl.cli.main import friendly


def register(data_app: typer.Typer) -> None:
    """Add the ``bbox`` command to the ``qvl data`` app."""
    data_app.command("bbox")(bbox)


@friendly
def bbox(source: Path = typer.Argument(..., help="COCO JSON, VOC XML file or folder, JSONL of xyxy boxes, "
                                                 "or a Qwen2.5-VL dataset (.json/.jsonl)."),
         fmt: str = typer.Option(..., "--from", help="Input format: coco, voc, jsonl or qwen25."),
         images: Path = typer.Option(None, help="Folder the image paths are relative to (sizes are read "
                                                "from it when the annotations lack them)."),
         out: Path = typer.Option(..., help="Output .jsonl (qvl / official fine-tuning format)."),
         mode: str = typer.Option("per-label", help="per-label: one sample per image and category; "
                                                    "all: one sample per image with every category."),
         template: str = typer.Option(None, help="Prompt template for boxes: {label} (per-label) or "
                                                 "{labels} (all)."),
         point_template: str = typer.Option(None, help="Prompt template for points."),
         fence: bool = typer.Option(False, help="Wrap answers in a ```json fence, as Qwen3-VL often answers."),
         overwrite: bool = typer.Option(False, help="Replace --out if it exists (the input never is)."),
         show: int = typer.Option(20, help="How many problem lines to print (all go to --problems)."),
         problems: Path = typer.Option(None, help="Write every problem line to this text file.")):
    """Convert boxes to Qwen3-VL's 0-1000 bbox_2d answers; clamp and report bad boxes."""
    from qvl.data import grounding as g
    from qvl.errors import QvlError
    from qvl.utils.fs import atomic_write_jsonl, atomic_write_text, refuse_same_file

    fmt = fmt.lower()
    mode = mode.replace("-", "_")
    refuse_same_file(out, source)
    if problems is not None:
        refuse_same_file(problems, source)
    if out.exists() and not overwrite:
        raise QvlError(f"{out} exists", fix="choose another --out or pass --overwrite")
    templates = g.Templates()
    key = "all" if mode == "all" else "per_label"
    if template:
        setattr(templates, key, template)
    if point_template:
        setattr(templates, "point_all" if mode == "all" else "point", point_template)
    samples, report = g.convert(fmt, source, images, templates, mode, fence)
    if not samples:
        raise QvlError(f"no samples produced from {source}\n{report}\n{report.details(show)}",
                       fix="check --from, --images and the annotation file")
    atomic_write_jsonl(out, samples)
    if problems is not None:
        atomic_write_text(problems, "".join(m + "\n" for m in report.messages))
    typer.echo(str(report))
    if report.messages and show:
        typer.echo(report.details(show))
    data_path = str(images.resolve()) if images is not None else "<the folder the image paths are relative to>"
    typer.echo(f"wrote {out}; register it with annotation_path: {out.resolve()} and data_path: {data_path}")
