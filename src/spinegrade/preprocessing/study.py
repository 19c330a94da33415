"""One study -> its cached stacks and its record (study.json, written last)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from spinegrade.io.stacks import NO_GEOMETRY_NOTE
from spinegrade.preprocessing.cache import (
    FORMAT_VERSION,
    INDEX_COLUMNS,
    CachedStack,
    atomic_open,
    save_stack,
    stack_bytes,
)
from spinegrade.preprocessing.series import CacheParams, cache_series

RECORD_NAME = "study.json"
_NO_GEOMETRY = NO_GEOMETRY_NOTE


@dataclass
class StudyTask:
    """One study to cache: its image folder and the series to read (id, description)."""

    split: str
    study_id: int
    folder: Path
    series: list[tuple[int, str]]


@dataclass
class StudyOutcome:
    """What one study gave: its index rows; ``status`` is done | resumed | crashed."""

    study_id: int
    rows: list[dict]
    n_slices: int = 0
    status: str = "done"


# ----------------------------------------------------------------------------- one study


def _row(task: StudyTask, series_id: int, description: str, **values) -> dict:
    row = dict.fromkeys(INDEX_COLUMNS, "")
    row.update(split=task.split, study_id=task.study_id, series_id=series_id, stack=-1)
    row.update(description=description, status="error")
    row.update(values)
    return row


def _ok_row(task: StudyTask, cs: CachedStack, rel: str, nbytes: int, reason: str) -> dict:
    d, h, w = cs.volume.shape
    return _row(
        task, cs.series_id, cs.description, stack=cs.stack, plane=cs.plane,
        direction=cs.direction, n_slices=d, height=h, width=w, orig_rows=cs.orig_shape[0],
        orig_cols=cs.orig_shape[1], has_geometry=cs.has_geometry, spacing_row=cs.spacing[0],
        spacing_col=cs.spacing[1], slice_spacing=cs.slice_spacing, status="ok", reason=reason,
        path=rel, bytes=nbytes,
    )  # fmt: skip


def _skipped_note(skipped: Sequence) -> str:
    """A short reason for files the reader skipped (first one named, then a count)."""
    if not skipped:
        return ""
    first = skipped[0]
    more = f" (+{len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"{len(skipped)} file(s) skipped: {Path(first.path).name}: {first.reason}{more}"


def _process_series(
    task: StudyTask, series_id: int, description: str, cache_dir: Path, params: CacheParams
) -> tuple[list[dict], int]:
    """Read, cache and write one series; returns its index rows and the slices decoded."""
    from spinegrade.io import DicomReadError, read_series  # the package's only DICOM reader

    folder = task.folder / str(series_id)
    if not folder.is_dir():
        reason = f"series folder missing: {folder} (listed in the series CSV; restore it)"
        return [_row(task, series_id, description, reason=reason)], 0
    try:
        read = read_series(folder)
        if not read.stacks:
            note = _skipped_note(read.skipped) or "the folder holds no DICOM files"
            return [_row(task, series_id, description, reason=f"no readable slices; {note}")], 0
        cached = cache_series(read.stacks, params, task.study_id, series_id, description)
    except DicomReadError as err:  # says what is wrong with which file, and what to do
        return [_row(task, series_id, description, reason=str(err))], 0
    except Exception as err:  # one bad series must not stop the study or the run
        reason = f"unexpected error ({type(err).__name__}: {err}); please report it"
        return [_row(task, series_id, description, reason=reason)], 0
    rows, n_slices, note = [], 0, _skipped_note(read.skipped)
    for cs in cached:
        rel = f"{task.split}/{task.study_id}/{series_id}_{cs.stack}.npz"
        nbytes = save_stack(cs, cache_dir / rel)
        reason = note if cs.has_geometry else "; ".join(filter(None, [_NO_GEOMETRY, note]))
        rows.append(_ok_row(task, cs, rel, nbytes, reason))
        n_slices += cs.volume.shape[0]
    return rows, n_slices


def source_fingerprint(task: StudyTask) -> dict[str, list[int]]:
    """Per series folder: [number of files, total bytes]; a change means the study is redone."""
    out: dict[str, list[int]] = {}
    for series_id, _ in task.series:
        n = size = 0
        folder = task.folder / str(series_id)
        if folder.is_dir():
            with os.scandir(folder) as it:
                for entry in it:
                    if entry.is_file():
                        n, size = n + 1, size + entry.stat().st_size
        out[str(series_id)] = [n, size]
    return out


def _remove_stale(study_dir: Path, keep: set[str]) -> None:
    """Delete leftovers of earlier runs: temporary files and stacks that no longer exist."""
    for p in study_dir.iterdir():
        if (
            p.name != RECORD_NAME
            and p.name not in keep
            and Path(p.name).with_suffix(".npz").name not in keep
            and (".tmp-" in p.name or p.suffix in (".npz", ".npy"))
        ):
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_reader() -> Iterator[None]:
    """Silence the reader's per-file warnings: the index and the summary carry those reasons,
    and warnings printed by workers would shred the progress bar."""
    log = logging.getLogger("spinegrade.io")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def process_study(task: StudyTask, cache_dir: Path, params: CacheParams) -> StudyOutcome:
    """Cache every series of one study and write its record last (marks the study complete)."""
    cache_dir = Path(cache_dir)
    study_dir = cache_dir / task.split / str(task.study_id)
    study_dir.mkdir(parents=True, exist_ok=True)
    # The old record goes first: until the new one is written the study reads as incomplete.
    (study_dir / RECORD_NAME).unlink(missing_ok=True)
    fingerprint = source_fingerprint(task)
    rows: list[dict] = []
    n_slices = 0
    with _quiet_reader():
        for series_id, description in task.series:
            series_rows, n = _process_series(task, series_id, description, cache_dir, params)
            rows += series_rows
            n_slices += n
    _remove_stale(study_dir, {Path(r["path"]).name for r in rows if r["path"]})
    record = {"format": FORMAT_VERSION, "params": asdict(params), "source": fingerprint}
    record.update(series=[[sid, desc] for sid, desc in task.series], rows=rows)
    with atomic_open(study_dir / RECORD_NAME) as f:
        f.write(json.dumps(record, indent=1).encode())
    return StudyOutcome(task.study_id, rows, n_slices, "done")


# ----------------------------------------------------------------------------- resume, index


def valid_record_rows(cache_dir: Path, task: StudyTask, params: CacheParams) -> list[dict] | None:
    """The index rows of a complete, up-to-date cached study, or None if it must be (re)done.

    Valid means: the record parses, was written with this format and these parameters for the
    same series and descriptions, the DICOM folders still hold the same files (count and bytes)
    and every stack file it lists exists with the size it was written with.
    """
    path = Path(cache_dir) / task.split / str(task.study_id) / RECORD_NAME
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("format") != FORMAT_VERSION or record.get("params") != asdict(params):
        return None
    if record.get("series") != [[sid, desc] for sid, desc in task.series]:
        return None  # the series list or a description changed in the CSV
    if record.get("source") != source_fingerprint(task):
        return None
    for row in record.get("rows", []):
        if row.get("status") == "ok" and stack_bytes(Path(cache_dir) / row["path"]) != row.get(
            "bytes"
        ):
            return None
    return record["rows"]


def collect_records(cache_dir: Path, params: CacheParams | None = None) -> list[dict]:
    """Index rows of every study record in the cache (all splits); with ``params``, only of
    studies cached with them (the manifest then describes every stack the index lists)."""
    rows: list[dict] = []
    for path in sorted(Path(cache_dir).glob(f"*/*/{RECORD_NAME}")):
        try:
            record = json.loads(path.read_text())
            if params is None or (
                record.get("params") == asdict(params) and record.get("format") == FORMAT_VERSION
            ):
                rows += record["rows"]
        except (OSError, ValueError, KeyError):
            continue  # unreadable: the study will be redone by the next run
    return rows


def crashed_outcome(task: StudyTask, reason: str) -> StudyOutcome:
    reason = f"study not cached: {reason}; rerun the same command to retry"
    return StudyOutcome(task.study_id, [_row(task, -1, "", reason=reason)], 0, "crashed")
