"""The built-in lumbar spine phantom: synthetic MRI studies in the RSNA 2024 layout, known truth.

``generate_dataset(out_dir, n_train, n_test)`` writes ``train.csv``, the series and coordinate
tables, ``train_images/`` and ``test_images/`` (complete MR DICOM files), ``sample_submission.csv``
and a ``truth/`` folder: the test labels, the true class probabilities of every row of both splits
(submission format) and the latent severities. Same seed, same bytes, whatever ``workers`` is.

How it works (one module each):
- :mod:`.phantom_labels`: a latent severity per cell with the real label statistics, and a reader
  model (ordinal probit) that turns it into labels, so P(class | latent) is known exactly;
- :mod:`.phantom_anatomy`: a 3D lumbar spine per study whose canal, recesses and foramina narrow
  with the latent severity; :mod:`.phantom_ops` / :mod:`.phantom_scene`: its tissue maps;
- :mod:`.phantom_render`: sagittal T1, sagittal T2/STIR and angled axial T2 acquisitions;
- :mod:`.phantom_study`: one study (series plan, instance numbers, files, label points);
- :mod:`.phantom_writer`: DICOM files and CSVs; :mod:`.phantom_preview`: PNG previews.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from spinegrade.constants import LABEL_COLUMNS, PROB_COLUMNS, SEVERITIES, row_id, submission_row_ids
from spinegrade.data.phantom_anatomy import Anatomy
from spinegrade.data.phantom_labels import (
    class_probs,
    sample_grades,
    sample_latents,
    weighted_optimal,
)
from spinegrade.data.phantom_preview import render_preview
from spinegrade.data.phantom_study import (
    EMPTY,
    StudyRecord,
    StudyTask,
    SynthConfig,
    generate_study,
    start_study,
)
from spinegrade.data.phantom_writer import write_csv
from spinegrade.parallel import process_pool

__all__ = [
    "SynthConfig",
    "generate_dataset",
    "load_study_anatomy",
    "render_preview",
    "study_ids",
    "truth_scores",
]

GENERATOR = "spinegrade.data.synthetic"
_MARKER = ".incomplete"  # written first, removed last: marks an interrupted run as ours


# ------------------------------------------------------------------------------ the dataset

_OUTPUTS = (
    "train.csv",
    "train_series_descriptions.csv",
    "train_label_coordinates.csv",
    "test_series_descriptions.csv",
    "sample_submission.csv",
    "train_images",
    "test_images",
    "truth",
)


def study_ids(seed: int, n: int) -> np.ndarray:
    """``n`` distinct study ids that look like the real ones (7-10 digits), fixed by the seed."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    ids: list[int] = []
    seen: set[int] = set()
    while len(ids) < n:
        for v in rng.integers(10**6, 4_290_000_000, size=n - len(ids) + 8):
            if int(v) not in seen and len(ids) < n:
                seen.add(int(v))
                ids.append(int(v))
    return np.asarray(ids, dtype=np.int64)


def generate_dataset(
    out_dir: str | Path,
    n_train: int,
    n_test: int = 0,
    seed: int = 0,
    workers: int = 1,
    quirks: bool = False,
    config: SynthConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, object]:
    """Write a phantom dataset in the RSNA layout to ``out_dir`` and return its summary.

    ``n_train`` training and ``n_test`` test studies. ``quirks`` (or ``config.quirks``) turns on
    the real-data oddities. An earlier phantom dataset in ``out_dir`` is replaced only with
    ``overwrite``; the leftovers of an interrupted phantom run are always replaced; data the
    generator did not write is never deleted. ``progress(done, total)`` is called after every
    study. The summary (also ``truth/phantom.json``) holds the seed, sizes, config and file count.
    """
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"need at least one study (n_train={n_train}, n_test={n_test})")
    cfg = config or SynthConfig()
    if quirks and not cfg.quirks:
        cfg = replace(cfg, quirks=True)
    out = Path(out_dir)
    _prepare(out, overwrite)
    ids = study_ids(seed, n_train + n_test)
    label_rng = np.random.default_rng(np.random.SeedSequence([seed, 11]))
    latents = sample_latents(label_rng, n_train + n_test, cfg.labels)
    probs = class_probs(latents, cfg.labels.reader_sd)
    grades = sample_grades(label_rng, probs)
    order = [("train", i) for i in range(n_train)] + [("test", i) for i in range(n_test)]
    tasks = [
        StudyTask(out, split, i, seed, int(ids[g]), latents[g], grades[g], cfg)
        for g, (split, i) in enumerate(order)
    ]
    records = _run(tasks, workers, progress)
    _write_tables(out, tasks, records, probs, latents)
    meta = {
        "generator": GENERATOR,
        "format_version": 1,
        "seed": seed,
        "n_train": n_train,
        "n_test": n_test,
        "config": asdict(cfg),
        "files": int(sum(r.n_files for r in records)),
    }
    (out / "truth" / "phantom.json").write_text(json.dumps(meta, indent=2) + "\n")
    (out / "truth" / _MARKER).unlink()
    return meta


def _prepare(out: Path, overwrite: bool) -> None:
    """Make ``out`` ready: refuse to touch data the phantom did not write."""
    existing = [name for name in _OUTPUTS if (out / name).exists()]
    ours = (out / "truth" / "phantom.json").is_file()
    interrupted = (out / "truth" / _MARKER).is_file()
    if existing and not interrupted:
        if not ours:
            raise FileExistsError(
                f"{out} already holds RSNA-style data ({', '.join(existing[:3])}) that the phantom "
                "generator did not write: choose an empty folder"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} already holds a phantom dataset: choose an empty folder or pass "
                "overwrite=True (--overwrite) to replace it"
            )
    for name in existing:
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (out / "truth").mkdir(parents=True, exist_ok=True)
    (out / "truth" / _MARKER).write_text(f"{GENERATOR}: generation in progress\n")


def _run(tasks: list[StudyTask], workers: int, progress) -> list[StudyRecord]:
    """Generate every study, in a process pool when ``workers`` > 1 (results in task order)."""
    records: list[StudyRecord] = []

    def done(rec: StudyRecord) -> None:
        records.append(rec)
        if progress is not None:
            progress(len(records), len(tasks))

    if workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            done(_safe_generate(t))
        return records
    # An interrupt (Ctrl-C, SIGTERM) terminates the workers; the marker file stays, so the same
    # command run again starts the folder afresh.
    with process_pool(min(workers, len(tasks)), _pool_context()) as pool:
        for rec in pool.map(_safe_generate, tasks, chunksize=1):
            done(rec)
    return records


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where available (workers fork from a server that imported the generator once),
    else spawn; never plain fork (no threads or locks inherited from the caller). As with any
    spawn-style pool, a script calling :func:`generate_dataset` with ``workers`` > 1 needs the
    ``if __name__ == "__main__":`` guard."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["spinegrade.data.synthetic"])
        return ctx
    return multiprocessing.get_context("spawn")


def _safe_generate(task: StudyTask) -> StudyRecord:
    try:
        return generate_study(task)
    except Exception as exc:  # name the study: a generator failure is a bug worth reporting
        raise RuntimeError(
            f"phantom study {task.study_id} ({task.split} #{task.index}, seed {task.seed}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def _write_tables(
    out: Path,
    tasks: list[StudyTask],
    records: list[StudyRecord],
    probs: np.ndarray,
    latents: np.ndarray,
) -> None:
    """train.csv, series and coordinate tables, sample submission and the truth folder."""
    splits: dict[str, list[int]] = {"train": [], "test": []}
    for g, t in enumerate(tasks):
        splits[t.split].append(g)
    for split, idx in splits.items():
        recs = [records[g] for g in idx]
        labels = [
            [r.study_id, *(SEVERITIES[v] if v != EMPTY else "" for v in r.grades)] for r in recs
        ]
        name = "train.csv" if split == "train" else "truth/test_labels.csv"
        write_csv(out / name, ["study_id", *LABEL_COLUMNS], labels)
        write_csv(
            out / f"{split}_series_descriptions.csv",
            ["study_id", "series_id", "series_description"],
            [(r.study_id, sid, desc) for r in recs for sid, desc in r.series],
        )
        if split == "train":
            write_csv(
                out / "train_label_coordinates.csv",
                ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
                [c for r in recs for c in r.coordinates],
            )
        # True class probabilities of every row (also the empty cells), in submission order.
        rows = sorted(
            (row_id(records[g].study_id, col), probs[g, j])
            for g in idx
            for j, col in enumerate(LABEL_COLUMNS)
        )
        write_csv(
            out / "truth" / f"{split}_true_probs.csv",
            ["row_id", *PROB_COLUMNS],
            [[rid, *(f"{v:.8f}" for v in p)] for rid, p in rows],
        )
    test_ids = [records[g].study_id for g in splits["test"]]
    write_csv(
        out / "sample_submission.csv",
        ["row_id", *PROB_COLUMNS],
        [[rid, "0.333333", "0.333333", "0.333333"] for rid in submission_row_ids(test_ids)],
    )
    write_csv(
        out / "truth" / "latent_severity.csv",
        ["study_id", "split", *LABEL_COLUMNS],
        [
            [r.study_id, t.split, *(f"{v:.6f}" for v in latents[g])]
            for g, (t, r) in enumerate(zip(tasks, records, strict=True))
        ],
    )


def load_study_anatomy(data_dir: str | Path, study_id: int) -> Anatomy:
    """Rebuild the 3D anatomy of one study of a phantom dataset (for checks and tools).

    Uses ``truth/phantom.json`` (seed, config) and ``truth/latent_severity.csv`` (latents, and the
    study's position in its split, which seeds its random stream).
    """
    truth = Path(data_dir) / "truth"
    meta_path, lat_path = truth / "phantom.json", truth / "latent_severity.csv"
    for path in (meta_path, lat_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; is {data_dir} a phantom dataset?")
    meta = json.loads(meta_path.read_text())
    with lat_path.open() as fh:
        rows = list(csv.DictReader(fh))
    index = {"train": 0, "test": 0}
    for row in rows:
        split = row["split"]
        if int(row["study_id"]) == int(study_id):
            latents = np.array([float(row[c]) for c in LABEL_COLUMNS])
            task = StudyTask(
                Path(data_dir),
                split,
                index[split],
                int(meta["seed"]),
                int(study_id),
                latents,
                np.zeros(len(LABEL_COLUMNS), dtype=int),
                SynthConfig(),
            )
            return start_study(task)[1]
        index[split] += 1
    raise KeyError(f"study {study_id} is not in {lat_path}")


# ----------------------------------------------------------------------- what is achievable


def truth_scores(labels, true_probs_csv: Path) -> dict[str, dict[str, float]]:
    """Scores of the phantom's truth on ``labels`` (wide, one row a study): the true
    probabilities and the Bayes limit; ``{}`` when ``true_probs_csv`` does not exist.

    The metric weights rows 1/2/4 by their true class, so the submission with the lowest expected
    score is the true probabilities reweighted the same way: that is the Bayes limit. Rows of
    studies not in ``labels`` are ignored.
    """
    import pandas as pd

    from spinegrade.metrics import score_frames

    if not Path(true_probs_csv).is_file():
        return {}
    probs = pd.read_csv(true_probs_csv)
    studies = {str(s) for s in labels["study_id"]}
    probs = probs[probs["row_id"].astype(str).str.split("_").str[0].isin(studies)]
    best = probs.copy()
    best[list(PROB_COLUMNS)] = weighted_optimal(probs[list(PROB_COLUMNS)].to_numpy())
    return {
        "true_probs": score_frames(labels, probs, strict=False),
        "bayes_limit": score_frames(labels, best, strict=False),
    }
