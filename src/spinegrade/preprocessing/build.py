"""Build the preprocessing cache: each series read once, rescaled, resampled, stored with geometry.

Layout written under ``CACHE_DIR`` (:mod:`spinegrade.preprocessing.cache` has the stack format)::

    index.csv                                  one row per stack and per failed series
    manifest.json                              the settings the cache was made with
    {split}/{study_id}/{series_id}_{stack}.npz a cached stack's geometry
    {split}/{study_id}/{series_id}_{stack}.npy its uint8 volume (memory-mapped when read)
    {split}/{study_id}/study.json              the study's record: its index rows, the parameters
                                               and a fingerprint of its DICOM folders

Every file is written under a temporary name and renamed, and ``study.json`` is written last, so a
study is complete exactly when its record exists and is valid. The index is rebuilt from all
records at the end of a run: a run that was killed and resumed ends with a complete index.

In-plane grid: the native pixel spacing, coarsened only to ``CacheParams.mm`` (finest spacing
kept) and so the longer side fits ``CacheParams.size`` pixels; the aspect ratio is kept. Crops
are then cut at their own mm per pixel from it (:mod:`spinegrade.data.crops`): a 40 mm crop of a
300 mm sagittal field keeps the ~70 native pixels it spans instead of the ~34 of a 256 px grid.

Storage choice: uint8. After a robust per-series percentile window (1st..99.5th -> 0..255) one
grey level is 0.4 % of the window, finer than the noise of clinical MR images (SNR ~ 20-50, i.e.
2-5 % of the range), and a model normalises to [0, 1] anyway. It is half the size of float16,
loads with no conversion and is stored uncompressed: zlib (``savez_compressed``) measured ~2.4 ms
a slice to write, more than all the rest of preprocessing, and no faster to load.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from spinegrade.preprocessing.cache import INDEX_NAME, write_index, write_manifest
from spinegrade.preprocessing.series import CacheParams
from spinegrade.preprocessing.study import (
    StudyOutcome,
    StudyTask,
    collect_records,
    crashed_outcome,
    process_study,
    valid_record_rows,
)
from spinegrade.util.parallel import process_pool
from spinegrade.util.progress import progress_bar

_MAX_TASKS_PER_CHILD = 64  # recycle workers now and then: keeps their memory from creeping up


@dataclass
class Summary:
    """The result of :func:`preprocess_dataset`, enough for the CLI's table and exit code."""

    split: str
    cache_dir: Path
    index_path: Path | None
    n_studies: int = 0
    n_processed: int = 0  # studies cached by this run
    n_resumed: int = 0  # studies already complete and valid, skipped
    n_stacks: int = 0  # ok stacks in this run's studies (processed or resumed)
    n_slices: int = 0  # slices decoded by this run
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)  # study_id, series_id, stack, reason
    # Series cached with a reason (files left out, no geometry): study_id, series_id, reason
    read_notes: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def slices_per_second(self) -> float:
        return self.n_slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when anything could be processed; 1 when nothing could."""
        return 0 if self.n_stacks > 0 else 1


def _version() -> str:
    from spinegrade import __version__

    return str(__version__)


# ----------------------------------------------------------------------------- study list


def list_studies(data_dir: Path, split: str) -> tuple[list[StudyTask], list[str]]:
    """Studies and series to cache: the series CSV when present, else every series folder."""
    image_dir = Path(data_dir) / f"{split}_images"
    csv = Path(data_dir) / f"{split}_series_descriptions.csv"
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"{image_dir} not found: DATA_DIR must hold {split}_images/{{study_id}}/{{series_id}}/"
            f"*.dcm (RSNA layout); check DATA_DIR and --split"
        )
    notes: list[str] = []
    if csv.is_file():
        from spinegrade.rsna import load_series_descriptions

        table = load_series_descriptions(csv)
        by_study: dict[int, list[tuple[int, str]]] = {}
        for st, se, desc in table[["study_id", "series_id", "series_description"]].itertuples(
            index=False
        ):
            by_study.setdefault(int(st), []).append((int(se), str(desc)))
    else:
        notes.append(f"{csv.name} not found: caching every series folder, descriptions from DICOM")
        by_study = {}
        for study in (p for p in image_dir.iterdir() if p.is_dir()):
            if not study.name.isdigit():
                notes.append(f"ignored folder {study} (study folders are numeric study ids)")
                continue
            found = sorted(int(s.name) for s in study.iterdir() if s.is_dir() and s.name.isdigit())
            by_study[int(study.name)] = [(s, "") for s in found]
    tasks = [
        StudyTask(split, st, image_dir / str(st), sorted(series))
        for st, series in sorted(by_study.items())
    ]
    return tasks, notes


# ----------------------------------------------------------------------------- driver


def _pool_outcomes(
    tasks: Iterable[StudyTask], cache_dir: Path, params: CacheParams, workers: int
) -> Iterator[StudyOutcome]:
    """Run studies on a process pool with a bounded queue (memory stays flat for any dataset).

    A worker that dies (killed, out of memory) breaks the pool: the studies it had in flight
    are reported as crashed (no record is written, so the next run retries them) and a fresh
    pool carries on with the rest. An interrupt, or closing this generator early, terminates
    the workers (studies are written atomically, so a killed one is simply redone next run).
    """
    todo = list(tasks)[::-1]
    extra = {"max_tasks_per_child": _MAX_TASKS_PER_CHILD} if sys.version_info >= (3, 11) else {}
    while todo:
        pending: dict[Future, StudyTask] = {}
        with process_pool(workers, _pool_context(), **extra) as pool:
            try:
                while todo or pending:
                    while todo and len(pending) < 2 * workers:
                        task = todo.pop()
                        pending[pool.submit(process_study, task, cache_dir, params)] = task
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:  # popped after: a broken pool reports this one too
                        yield _outcome_of(fut, pending[fut])
                        del pending[fut]
            except BrokenProcessPool:
                for task in pending.values():
                    yield crashed_outcome(task, "worker process died (killed or out of memory)")


def _pool_context() -> mp.context.BaseContext:
    """forkserver where available, else spawn: workers start clean (no threads or locks
    inherited from the caller, unlike fork) and can be recycled; forkserver forks them from a
    server that imported the reader once, so a new worker costs milliseconds, not an import.
    Like any spawn-style pool, a script calling this needs the ``if __name__ == "__main__"``
    guard."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["spinegrade.preprocessing.build", "spinegrade.io"])
        return ctx
    return mp.get_context("spawn")


def _outcome_of(fut: Future, task: StudyTask) -> StudyOutcome:
    try:
        return fut.result()
    except BrokenProcessPool:
        raise
    except Exception as err:  # e.g. the cache disk is full: report it, keep going
        return crashed_outcome(task, f"{type(err).__name__}: {err}")


def _inline_outcomes(
    tasks: Iterable[StudyTask], cache_dir: Path, params: CacheParams
) -> Iterator[StudyOutcome]:
    for task in tasks:
        try:
            yield process_study(task, cache_dir, params)
        except Exception as err:
            yield crashed_outcome(task, f"{type(err).__name__}: {err}")


def _study_bar(total: int, enabled: bool) -> Callable[[StudyOutcome | None], None]:
    """A tqdm bar over studies showing slices per second; returns an update(outcome) callable."""
    bar = progress_bar(total=total, unit="study", enabled=enabled)
    state = {"slices": 0, "t0": time.perf_counter()}

    def update(outcome: StudyOutcome | None) -> None:
        if outcome is None:
            bar.close()
            return
        state["slices"] += outcome.n_slices
        rate = state["slices"] / max(time.perf_counter() - state["t0"], 1e-9)
        bar.set_postfix_str(f"{rate:.0f} slices/s", refresh=False)
        bar.update(1)

    return update


def preprocess_dataset(
    data_dir: str | Path,
    cache_dir: str | Path,
    split: str = "train",
    workers: int = 1,
    size: int = 256,
    limit: int | None = None,
    low_pct: float = 1.0,
    high_pct: float = 99.5,
    progress: bool = True,
    mm: float = 0.0,
) -> Summary:
    """Cache every series of ``split`` under ``data_dir`` into ``cache_dir``; resumable.

    ``size`` and ``mm`` are a run config's ``data.cache_size`` and ``data.cache_mm`` (see
    :meth:`CacheParams.grid`); they are recorded in ``manifest.json``, which train and predict
    check against their config.
    ``workers=1`` runs inline; more use a process pool over studies. ``limit`` takes the first N
    studies (by study id). Studies already cached with the same parameters and unchanged DICOM
    folders are skipped. The index is rebuilt from all study records at the end.
    """
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(
            f"percentiles must satisfy 0 <= low < high <= 100, got {low_pct}, {high_pct}"
        )
    if size < 8:
        raise ValueError(f"--size {size} is too small for a useful grid (use e.g. 256)")
    if mm < 0:
        raise ValueError(f"data.cache_mm must be >= 0 (0 = native spacing), got {mm}")
    t0 = time.perf_counter()
    params, cache_dir = CacheParams(size, low_pct, high_pct, mm), Path(cache_dir)
    tasks, notes = list_studies(Path(data_dir), split)
    tasks = tasks[:limit] if limit is not None else tasks
    summary = Summary(split, cache_dir, None, n_studies=len(tasks), notes=notes)
    if not tasks:
        summary.notes.append(f"no studies found for split {split!r} under {data_dir}")
        return summary
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in cache_dir.glob(f".{INDEX_NAME}.tmp-*"):  # an index write that was killed
        stale.unlink(missing_ok=True)
    update = _study_bar(len(tasks), progress)
    todo: list[StudyTask] = []
    for task in tasks:
        rows = valid_record_rows(cache_dir, task, params)
        if rows is None:
            todo.append(task)
        else:
            outcome = StudyOutcome(task.study_id, rows, 0, "resumed")
            _account(summary, outcome)
            update(outcome)
    runner = (
        _inline_outcomes(todo, cache_dir, params)
        if workers <= 1
        else _pool_outcomes(todo, cache_dir, params, workers)
    )
    try:
        for outcome in runner:
            _account(summary, outcome)
            update(outcome)
    finally:
        runner.close()  # interrupted between studies: stop the workers before writing the index
        update(None)
        summary.index_path = write_index(cache_dir, collect_records(cache_dir, params))
        write_manifest(cache_dir, params.settings(), _version())
        summary.seconds = time.perf_counter() - t0
    return summary


def _account(summary: Summary, outcome: StudyOutcome) -> None:
    """Add one study's outcome to the run summary."""
    if outcome.status == "resumed":
        summary.n_resumed += 1
    elif outcome.status == "done":
        summary.n_processed += 1
    summary.n_slices += outcome.n_slices
    noted: set[tuple] = set()
    for row in outcome.rows:
        if row["status"] == "ok":
            summary.n_stacks += 1
            key = (row["study_id"], row["series_id"], row["reason"])
            if row["reason"] and key not in noted:  # once per series, not once per stack
                noted.add(key)
                summary.read_notes.append(
                    {"study_id": key[0], "series_id": key[1], "reason": key[2], "status": "ok"}
                )
        else:
            summary.failures.append(
                {k: row[k] for k in ("study_id", "series_id", "stack", "description", "reason")}
            )


def print_summary(summary: Summary, console=None, max_rows: int = 40) -> None:
    """Print the run's counts, what was skipped and why, and what was read with a note."""
    from rich.console import Console

    console = console or Console(stderr=False)
    rate = summary.slices_per_second
    console.print(
        f"[bold]{summary.split}[/]: {summary.n_studies} studies — {summary.n_processed} cached, "
        f"{summary.n_resumed} already complete; {summary.n_stacks} stacks ok, "
        f"{len(summary.failures)} skipped; {summary.n_slices} slices in {summary.seconds:.1f} s "
        f"({rate:.0f} slices/s)"
    )
    for note in summary.notes:
        console.print(f"note: {note}")
    # One line per series, never wrapped: each names the study and series folder and says why.
    plain = {"soft_wrap": True, "markup": False, "highlight": False}
    for n in summary.read_notes[:max_rows]:
        console.print(f"study {n['study_id']} series {n['series_id']}: {n['reason']}", **plain)
    if len(summary.read_notes) > max_rows:
        console.print(f"... and {len(summary.read_notes) - max_rows} more notes: see {INDEX_NAME}")
    if summary.failures:
        console.print(f"{len(summary.failures)} skipped (status=error in the index):")
    for f in summary.failures[:max_rows]:
        series = f"series {f['series_id']}" if f["series_id"] >= 0 else "all series"
        desc = f" ({f['description']})" if f["description"] else ""
        console.print(f"skipped study {f['study_id']} {series}{desc}: {f['reason']}", **plain)
    if len(summary.failures) > max_rows:
        console.print(f"... and {len(summary.failures) - max_rows} more: see {INDEX_NAME}")
    if summary.index_path is not None:
        console.print(f"index: {summary.index_path}")
    if summary.exit_code:
        console.print("[red]nothing could be processed[/]")
