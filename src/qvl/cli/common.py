"""Helpers shared by command modules (kept apart from main.py so modules can import them first)."""

from __future__ import annotations

import functools

import typer

from qvl.errors import QvlError


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
