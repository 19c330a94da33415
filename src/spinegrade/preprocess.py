"""Build the preprocessing cache: each series read once, rescaled, resampled, stored with geometry.

Layout written under ``CACHE_DIR`` (see :mod:`spinegrade.cache` for the stack format)::

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
are then cut at their own mm per pixel from it (:mod:`spinegrade.crops`): a 40 mm crop of a
300 mm sagittal field keeps the ~70 native pixels it spans instead of the ~34 of a 256 px grid.

Storage choice: uint8. After a robust per-series percentile window (1st..99.5th -> 0..255) one
grey level is 0.4 % of the window, finer than the noise of clinical MR images (SNR ~ 20-50, i.e.
2-5 % of the range), and a model normalises to [0, 1] anyway. It is half the size of float16,
loads with no conversion and is stored uncompressed: zlib (``savez_compressed``) measured ~2.4 ms
a slice to write, more than all the rest of preprocessing, and no faster to load.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from spinegrade.cache import (
    FORMAT_VERSION,
    INDEX_COLUMNS,
    INDEX_NAME,
    MANIFEST_NAME,
    CachedStack,
    atomic_open,
    check_cache_settings,
    save_stack,
    stack_bytes,
    write_index,
    write_manifest,
)
from spinegrade.io.types import Stack
from spinegrade.parallel import process_pool
from spinegrade.progress import progress_bar

RECORD_NAME = "study.json"
_MAX_TASKS_PER_CHILD = 64  # recycle workers now and then: keeps their memory from creeping up
_MAX_PERCENTILE_SAMPLES = 1 << 16  # rank error of a 99.5th percentile ~0.03 percentile points
_NO_GEOMETRY = "no patient geometry in the files: nominal grid, points cannot be mapped"


@dataclass(frozen=True)
class CacheParams:
    """What the cached pixels depend on; a study cached with other parameters is redone."""

    size: int = 256  # the longer in-plane side is at most this many pixels
    low_pct: float = 1.0
    high_pct: float = 99.5
    mm: float = 0.0  # finest in-plane spacing kept (mm a pixel); 0 = the native spacing

    @classmethod
    def from_config(cls, data) -> CacheParams:
        """The parameters a run's ``data`` config (:class:`spinegrade.config.DataConfig`) needs."""
        return cls(size=int(data.cache_size), mm=float(data.cache_mm))

    def settings(self) -> dict:
        """The manifest's settings, named as config keys (what a run compares against)."""
        return {
            "data.cache_size": self.size,
            "data.cache_mm": self.mm,
            "low_pct": self.low_pct,
            "high_pct": self.high_pct,
        }

    def grid(self, shape: tuple[int, int], spacing: tuple[float, float]) -> tuple[int, int]:
        """Cached (H, W) of a slice of ``shape`` pixels at ``spacing`` (dy, dx) mm.

        One square spacing for both axes: the native finest spacing, coarsened to ``mm`` and
        until the longer side fits ``size``; never finer than native (no upsampling).
        """
        (h0, w0), (dy0, dx0) = shape, (float(v) for v in spacing)
        step = max(min(dy0, dx0), self.mm, max(h0 * dy0, w0 * dx0) / self.size)
        return max(1, round(h0 * dy0 / step)), max(1, round(w0 * dx0 / step))


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
    notes: list[str] = field(default_factory=list)

    @property
    def slices_per_second(self) -> float:
        return self.n_slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 when anything could be processed; 1 when nothing could."""
        return 0 if self.n_stacks > 0 else 1


def check_cache(cache_dir: str | Path, data_cfg, data_dir: str | Path = "DATA_DIR") -> None:
    """Raise ValueError unless ``cache_dir`` was made with the run config's ``data`` settings.

    The error names the differing settings and the exact `spinegrade preprocess` to rerun.
    """
    params = CacheParams.from_config(data_cfg)
    fix = (
        f"rerun `spinegrade preprocess {data_dir} --cache {cache_dir} --set data.cache_size="
        f"{params.size} --set data.cache_mm={params.mm}` (or train with a config matching the "
        "cache)"
    )
    check_cache_settings(cache_dir, params.settings(), fix)


def refuse_other_cache(cache_dir: Path, data_cfg, run_dir: str | Path) -> None:
    """Prediction: refuse an existing cache folder made with settings other than the run's
    (it is the user's, maybe a training cache: never rebuilt in place)."""
    if not (Path(cache_dir) / MANIFEST_NAME).is_file():
        return  # a new (or unfinished) work folder: preprocessing writes it with the run's settings
    fix = (
        f"the run {run_dir} needs data.cache_size={data_cfg.cache_size} data.cache_mm="
        f"{data_cfg.cache_mm}; give `spinegrade predict` another --cache work folder (or delete "
        f"{cache_dir}), it is not rebuilt in place"
    )
    check_cache_settings(cache_dir, CacheParams.from_config(data_cfg).settings(), fix)


# ----------------------------------------------------------------------------- pixels


def resize_volume(volume: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize every slice of a float32 ``(D, H, W)`` volume to ``size`` (H, W; an int: square).

    PIL's bilinear resize widens its triangle filter by the reduction factor, so downsampling is
    antialiased (no aliasing of fine texture such as the disc annulus); it was the fastest good
    method measured here (torch ``interpolate(antialias=True)`` 1.5-2x slower, scipy zoom 5x).
    """
    d, h, w = volume.shape
    th, tw = (size, size) if isinstance(size, int) else size
    if (h, w) == (th, tw):
        return np.ascontiguousarray(volume, dtype=np.float32)
    out = np.empty((d, th, tw), dtype=np.float32)
    for i in range(d):
        img = Image.fromarray(np.ascontiguousarray(volume[i], dtype=np.float32), mode="F")
        out[i] = np.asarray(img.resize((tw, th), Image.Resampling.BILINEAR))
    return out


def robust_range(volumes: Sequence[np.ndarray], low: float, high: float) -> tuple[float, float]:
    """Low and high percentiles of all voxels of a series, from a regular in-plane subsample.

    Taken on the resized volumes (what is stored, and 2-4x fewer voxels to look at); one window
    for all stacks of a series keeps their intensities comparable.
    """
    total = sum(v.size for v in volumes)
    step = max(1, int(np.ceil(np.sqrt(total / _MAX_PERCENTILE_SAMPLES))))
    sample = np.concatenate([v[:, ::step, ::step].ravel() for v in volumes])
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(sample, [low, high])
    return float(lo), float(hi)


def to_uint8(volume: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``[lo, hi]`` linearly onto 0..255 (clipped, rounded); a constant image gives zeros."""
    if not hi > lo:
        return np.zeros(volume.shape, dtype=np.uint8)
    v = (volume - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    # fmax/fmin rather than clip: they also send NaN to 0 (and infinities to the ends).
    np.fmax(v, 0.0, out=v)
    np.fmin(v, 255.0, out=v)
    v += 0.5  # round half up: values are non-negative here
    return v.astype(np.uint8)


def cache_geometry(
    stack: Stack, size: int | tuple[int, int]
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Positions of cached voxel (z, 0, 0), cached (dy, dx) spacing and original (rows, cols).

    The resize maps pixel edges onto pixel edges, so cached pixel ``x'`` has its centre at
    original ``x = (x' + 0.5) * W0 / W - 0.5``: voxel (0, 0) lies half a cached pixel minus half
    an original pixel inside the original (0, 0) centre given by ImagePositionPatient.
    """
    h0, w0 = stack.pixels.shape[1:]
    dy0, dx0 = (float(v) for v in stack.pixel_spacing)
    h, w = (size, size) if isinstance(size, int) else size
    sy, sx = h0 / h, w0 / w  # original pixels per cached pixel
    offset = (0.5 * sx - 0.5) * dx0 * np.asarray(stack.row_dir) + (0.5 * sy - 0.5) * dy0 * (
        np.asarray(stack.col_dir)
    )
    positions = np.asarray(stack.positions, dtype=np.float64) + offset
    return positions, (dy0 * sy, dx0 * sx), (int(h0), int(w0))


def cache_series(
    stacks: Sequence[Stack], params: CacheParams, study_id: int, series_id: int, description: str
) -> list[CachedStack]:
    """Turn the stacks of one series into cached stacks; the intensity window is per series."""
    grids = [params.grid(s.pixels.shape[1:], s.pixel_spacing) for s in stacks]
    resized = [resize_volume(s.pixels, g) for s, g in zip(stacks, grids, strict=True)]
    lo, hi = robust_range(resized, params.low_pct, params.high_pct)
    out = []
    for k, (stack, vol) in enumerate(zip(stacks, resized, strict=True)):
        positions, spacing, orig_shape = cache_geometry(stack, grids[k])
        out.append(
            CachedStack(
                volume=to_uint8(vol, lo, hi),
                positions=positions,
                row_dir=np.asarray(stack.row_dir, dtype=np.float64),
                col_dir=np.asarray(stack.col_dir, dtype=np.float64),
                spacing=spacing,
                orig_shape=orig_shape,
                instance_numbers=np.asarray(stack.instance_numbers, dtype=np.int64),
                study_id=int(study_id),
                series_id=int(series_id),
                stack=k,
                description=description or stack.series_description,
                plane=stack.plane,
                direction=stack.direction,
                has_geometry=bool(getattr(stack, "has_geometry", True)),
            )
        )
    return out


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
    from spinegrade.io import read_series  # the only DICOM reader of the package

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
    except Exception as err:  # one bad series must not stop the study or the run
        return [_row(task, series_id, description, reason=f"{type(err).__name__}: {err}")], 0
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
                    yield _crashed(task, "worker process died (killed or out of memory)")


def _pool_context() -> mp.context.BaseContext:
    """forkserver where available, else spawn: workers start clean (no threads or locks
    inherited from the caller, unlike fork) and can be recycled; forkserver forks them from a
    server that imported the reader once, so a new worker costs milliseconds, not an import.
    Like any spawn-style pool, a script calling this needs the ``if __name__ == "__main__"``
    guard."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["spinegrade.preprocess", "spinegrade.io"])
        return ctx
    return mp.get_context("spawn")


def _outcome_of(fut: Future, task: StudyTask) -> StudyOutcome:
    try:
        return fut.result()
    except BrokenProcessPool:
        raise
    except Exception as err:  # e.g. the cache disk is full: report it, keep going
        return _crashed(task, f"{type(err).__name__}: {err}")


def _crashed(task: StudyTask, reason: str) -> StudyOutcome:
    reason = f"study not cached: {reason}; rerun the same command to retry"
    return StudyOutcome(task.study_id, [_row(task, -1, "", reason=reason)], 0, "crashed")


def _inline_outcomes(
    tasks: Iterable[StudyTask], cache_dir: Path, params: CacheParams
) -> Iterator[StudyOutcome]:
    for task in tasks:
        try:
            yield process_study(task, cache_dir, params)
        except Exception as err:
            yield _crashed(task, f"{type(err).__name__}: {err}")


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
    for row in outcome.rows:
        if row["status"] == "ok":
            summary.n_stacks += 1
        else:
            summary.failures.append(
                {k: row[k] for k in ("study_id", "series_id", "stack", "description", "reason")}
            )


def print_summary(summary: Summary, console=None, max_rows: int = 40) -> None:
    """Print the run's counts and a table of what was skipped and why (rich)."""
    from rich.console import Console
    from rich.table import Table

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
    if summary.failures:
        table = Table(title="Skipped (status=error in the index)", show_lines=False)
        for name in ("study", "series", "description", "reason"):
            table.add_column(name, overflow="fold")
        for f in summary.failures[:max_rows]:
            series = str(f["series_id"]) if f["series_id"] >= 0 else "-"
            table.add_row(str(f["study_id"]), series, str(f["description"]), str(f["reason"]))
        console.print(table)
        if len(summary.failures) > max_rows:
            console.print(f"... and {len(summary.failures) - max_rows} more: see {INDEX_NAME}")
    if summary.index_path is not None:
        console.print(f"index: {summary.index_path}")
    if summary.exit_code:
        console.print("[red]nothing could be processed[/]")
