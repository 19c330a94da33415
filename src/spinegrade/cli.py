"""Command-line interface: each command is a thin wrapper over one library function."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="spinegrade: lumbar spine degeneration grading on MRI (RSNA 2024 format).",
)

F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(fn: F) -> F:
    """Turn the library's expected errors into one clear line on stderr and exit code 2.

    The library raises ValueError / FileNotFoundError / KeyError with messages that name the file,
    study or series and say what to do; a traceback would only hide that message.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
            msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from exc

    return wrapper  # type: ignore[return-value]


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging")) -> None:
    """spinegrade: lumbar spine degeneration grading on MRI (RSNA 2024 format)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
@cli_errors
def evaluate(
    submission: Path = typer.Argument(..., help="Submission CSV: row_id,normal_mild,moderate,severe"),
    labels: Path = typer.Option(..., "--labels", help="train.csv-format labels (wide table)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Score a submission with the exact RSNA 2024 metric."""
    from spinegrade.metrics import evaluate_files

    result = evaluate_files(submission, labels)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for key in ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score"):
        typer.echo(f"{key:<20} {result[key]:.4f}")


if __name__ == "__main__":
    app()
