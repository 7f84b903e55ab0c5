"""The `qvl` command. Each sub-command lives in its own module; heavy imports happen inside commands."""

from __future__ import annotations

import sys

import typer

from qvl.cli.common import friendly  # noqa: F401  (re-exported for command modules)
from qvl.utils.compile_cache import keep_compiled_code
from qvl.utils.library_warnings import quiet_library_noise

quiet_library_noise()  # before any command imports a library
keep_compiled_code()  # before anything compiles: later runs reuse what this one compiled

app = typer.Typer(
    help="qvl: fine-tune, evaluate and serve Qwen3-VL on one GPU (or a CPU to try things).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


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
