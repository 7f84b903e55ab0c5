"""The `qvl` command. Each sub-command lives in its own module; heavy imports happen inside commands."""

from __future__ import annotations

import functools
import sys

import typer

from qvl.errors import QvlError

app = typer.Typer(
    help="qvl: fine-tune, evaluate and serve Qwen3-VL on one GPU (or a CPU to try things).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def friendly(fn):
    """Print QvlError as a message (no traceback) and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QvlError as e:
            typer.secho(f"error: {e.render()}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _register() -> None:
    from qvl.cli import data_cmd, demo_cmd, model_cmd

    app.add_typer(model_cmd.app, name="model")
    app.add_typer(data_cmd.app, name="data")
    demo_cmd.register(app)
    # Optional command groups: each module registers itself if present.
    for mod in ("plan_cmd", "train_cmd", "serve_cmd", "eval_cmd"):
        try:
            module = __import__(f"qvl.cli.{mod}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != f"qvl.cli.{mod}":
                raise
            continue
        module.register(app)


_register()


def main() -> None:  # pragma: no cover - entry point
    sys.exit(app())
