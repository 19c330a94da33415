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
    submission: Path = typer.Argument(
        ..., help="Submission CSV: row_id,normal_mild,moderate,severe"
    ),
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


@app.command()
@cli_errors
def folds(
    data_dir: Path = typer.Argument(..., help="RSNA data folder holding train.csv"),
    out: Path = typer.Option(Path("folds.csv"), "--out", help="Where to write study_id,fold"),
    n_folds: int = typer.Option(5, "--n-folds", min=2, help="Number of folds"),
    seed: int = typer.Option(42, "--seed", help="Shuffle seed: same seed, same folds"),
) -> None:
    """Make study-grouped, severity-stratified CV folds from train.csv and save them."""
    from rich.console import Console
    from rich.table import Table

    from spinegrade.data.rsna import fold_summary, load_train, make_folds, save_folds

    labels = load_train(data_dir / "train.csv")
    fold_table = make_folds(labels, n_folds=n_folds, seed=seed)
    save_folds(fold_table, out)
    summary = fold_summary(labels, fold_table)
    table = Table(title=f"{len(labels)} studies in {n_folds} folds (seed {seed}) -> {out}")
    for name in ("fold", *summary.columns):
        table.add_column(name.replace("_", " "), justify="right")
    for k, row in summary.iterrows():
        table.add_row(str(k), *(str(v) for v in row.tolist()))
    table.add_row("all", *(str(v) for v in summary.sum().tolist()), style="bold")
    Console().print(table)


@app.command("inspect")
def inspect_cmd(
    path: Path = typer.Argument(..., help="A series folder of DICOM files, or a study folder"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Show what the DICOM reader sees: stacks, orientation, slices, spacing, skipped files."""
    from spinegrade.io.describe import inspect_path, print_inspection
    from spinegrade.io.dicom import DicomReadError

    try:
        report = inspect_path(path)
    except DicomReadError as exc:
        typer.echo(f"Error: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(report))
    else:
        print_inspection(report)
    if not any("stacks" in s for s in report["series"]):
        raise typer.Exit(1)  # nothing readable: let scripts notice


if __name__ == "__main__":
    app()
