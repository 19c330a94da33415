"""Cross-validation folds as data: grouped by patient, stratified by source and severity profile.

Folds are made once (seeded), written to ``folds.csv`` (``study_id, fold`` and, for runs that
record them, each study's ``source`` and ``patient_id``) and read back by every later call, so
every out-of-fold number of a run comes from the same split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.rsna.tables import (
    MISSING_LABEL,
    Parser,
    RSNAFormatError,
    _int_cell,
    _load,
    _require_columns,
    label_matrix,
)
from spinegrade.task import (
    COLUMN_CONDITION,
    CONDITION_GROUP,
    CONDITIONS,
    GROUPS,
    LABEL_COLUMNS,
    RSNA_2024,
    SEVERITIES,
    Task,
)

FOLD_COLUMNS: tuple[str, ...] = ("study_id", "fold")
SOURCE_COLUMNS: tuple[str, ...] = ("source", "patient_id")  # optional, recorded by training


def severity_profile(wide: pd.DataFrame) -> pd.DataFrame:
    """Worst grade (0/1/2) per metric group and study; empty cells are ignored (all empty -> 0)."""
    codes = label_matrix(wide)
    profile = pd.DataFrame({"study_id": wide["study_id"].to_numpy(dtype=np.int64)})
    for group in GROUPS:
        idx = [
            i for i, c in enumerate(LABEL_COLUMNS) if CONDITION_GROUP[COLUMN_CONDITION[c]] == group
        ]
        profile[group] = np.clip(codes[:, idx].max(axis=1), 0, None)
    return profile


# Stratum keys from fine to coarse. Spinal stays separate longest: the any-severe-spinal term of
# the metric is decided per study, so each fold needs its share of severe spinal stenosis.
_STRATUM_KEYS: tuple[Callable[[int, int, int], str], ...] = (
    lambda sp, fo, su: f"spinal{sp}/foraminal{fo}/subarticular{su}",
    lambda sp, fo, su: f"spinal{sp}/other{max(fo, su)}",
    lambda sp, fo, su: f"worst{max(sp, fo, su)}",
)


def _task_strata(wide: pd.DataFrame, task: Task) -> tuple[list, list[str], tuple]:
    """Another task's strata: the worst grade of its first condition over the levels (e.g. the
    most degenerated disc's Pfirrmann grade), nothing coarser before the pool."""
    codes = label_matrix(wide, task)[:, : len(task.levels)]
    worst = np.clip(codes.max(axis=1), -1, None).tolist()
    return [(w,) for w in worst], [f"worst{w}" for w in worst], ()


def fold_strata(wide: pd.DataFrame, n_folds: int, task: Task = RSNA_2024) -> pd.Series:
    """Stratum of every study (index study_id), coarsened until each has >= ``n_folds`` studies.

    Studies in rare strata move to the next coarser key; whatever is still rare after the
    coarsest key is pooled, and a pool smaller than ``n_folds`` joins the largest stratum.
    """
    if task.is_rsna:
        profile = severity_profile(wide)
        triples = profile[list(GROUPS)].to_numpy(dtype=np.int64).tolist()
        keys = [_STRATUM_KEYS[0](*t) for t in triples]
        coarser_keys: tuple = _STRATUM_KEYS[1:]
    else:
        triples, keys, coarser_keys = _task_strata(wide, task)
        profile = wide[["study_id"]]
    for coarser in (*coarser_keys, None):
        counts = pd.Series(keys).value_counts()
        rare = [i for i, k in enumerate(keys) if counts[k] < n_folds]
        if not rare:
            break
        for i in rare:
            keys[i] = coarser(*triples[i]) if coarser is not None else "rest"
    counts = pd.Series(keys).value_counts()
    if counts.get("rest", n_folds) < n_folds and len(counts) > 1:
        largest = counts.drop("rest").idxmax()
        keys = [largest if k == "rest" else k for k in keys]
    return pd.Series(keys, index=profile["study_id"], name="stratum")


def make_folds(
    wide: pd.DataFrame,
    n_folds: int = 5,
    seed: int = 42,
    studies: pd.DataFrame | None = None,
    task: Task = RSNA_2024,
) -> pd.DataFrame:
    """Assign every study to one of ``n_folds`` folds: DataFrame(study_id, fold), by study_id.

    One row per study makes the split grouped by study (all series and levels of a study stay
    together); stratifying by the severity profile keeps rare severe cases in every fold. The
    result depends only on the labels, ``n_folds``, ``seed`` and ``studies`` (not row order).

    ``studies`` (study_id, source, patient_id; e.g. from several data folders) adds both columns
    to the result, stratifies by source first (every fold validates on every source, e.g. on
    real spines as well as phantoms) and groups by patient (a patient with two studies never
    sits on both sides of a fold). One source with one study a patient gives the same folds as
    without ``studies``.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    dup = wide["study_id"].duplicated()
    if dup.any():
        raise ValueError(f"study_id {wide['study_id'][dup].iloc[0]} appears twice; one row a study")
    if len(wide) < n_folds:
        raise ValueError(
            f"{len(wide)} studies cannot fill {n_folds} folds; use --n-folds {max(len(wide), 2)} "
            "or fewer, or add studies"
        )
    ordered = wide.sort_values("study_id", kind="stable").reset_index(drop=True)
    ids = ordered["study_id"].to_numpy(np.int64)
    if studies is None:
        strata = fold_strata(ordered, n_folds, task).to_numpy()
        groups = None
    else:
        info = studies.set_index("study_id").loc[ids]
        # Severity strata are made within each source (coarsened to its own size), then keyed by
        # the source: the sort order of the keys, and so the split, is unchanged for one source.
        strata = np.empty(len(ids), dtype=object)
        for name in pd.unique(info["source"]):
            m = (info["source"] == name).to_numpy()
            inner = fold_strata(ordered[m], min(n_folds, int(m.sum())), task).to_numpy()
            strata[m] = [f"{name}|{k}" for k in inner]
        patients = info["patient_id"].astype(str).to_numpy()
        groups = patients if len(set(patients)) < len(patients) else None
    fold = np.empty(len(ordered), dtype=np.int64)
    if groups is None:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        split = splitter.split(np.zeros(len(ordered)), strata)
    else:
        if len(set(groups)) < n_folds:
            raise ValueError(f"{len(set(groups))} patients cannot fill {n_folds} folds")
        grouped = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        split = grouped.split(np.zeros(len(ordered)), strata, groups)
    for k, (_, test_idx) in enumerate(split):
        fold[test_idx] = k
    out = pd.DataFrame({"study_id": ids, "fold": fold})
    if studies is not None:
        out["source"] = info["source"].to_numpy()
        out["patient_id"] = info["patient_id"].astype(str).to_numpy()
    return out


def fold_summary(wide: pd.DataFrame, folds: pd.DataFrame) -> pd.DataFrame:
    """Per fold: studies, graded cells by severity, empty cells, studies with severe spinal."""
    codes = label_matrix(wide)
    fold_of = folds.set_index("study_id")["fold"]
    missing = sorted(set(wide["study_id"]) - set(fold_of.index))
    if missing:
        raise ValueError(f"studies without a fold, e.g. {missing[:5]}; remake the folds")
    fold = fold_of.loc[wide["study_id"]].to_numpy()
    spinal = [i for i, c in enumerate(LABEL_COLUMNS) if COLUMN_CONDITION[c] == CONDITIONS[0]]
    rows = []
    for k in sorted(set(fold.tolist())):
        sel = codes[fold == k]
        row: dict[str, int] = {"fold": k, "studies": len(sel)}
        row.update({s: int((sel == i).sum()) for i, s in enumerate(SEVERITIES)})
        row["missing"] = int((sel == MISSING_LABEL).sum())
        row["severe_spinal_studies"] = int((sel[:, spinal] == 2).any(axis=1).sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("fold")


def save_folds(folds: pd.DataFrame, path: Path | str) -> Path:
    """Write ``study_id,fold`` as CSV (folds are data: made once, reused by every run)."""
    from spinegrade.util.atomic import write_csv

    _require_columns(folds, FOLD_COLUMNS, "fold table")
    extra = [c for c in SOURCE_COLUMNS if c in folds.columns]
    return write_csv(path, folds[[*FOLD_COLUMNS, *extra]])


def _text_cell(text: str) -> str:
    if not text:
        raise ValueError("empty")
    return text


def load_folds(path: Path | str, study_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Read a ``folds.csv``; with ``study_ids``, check that each of them has a fold.

    Runs record each study's ``source`` and ``patient_id`` beside its fold; older folds.csv
    files (``study_id, fold`` only) load as they are.
    """
    parsers: dict[str, Parser] = {"study_id": _int_cell, "fold": _int_cell}
    if _has_source_columns(Path(path)):
        parsers |= dict.fromkeys(SOURCE_COLUMNS, _text_cell)
    folds, lines = _load(path, parsers, ["study_id"])
    negative = [
        f"line {ln}: fold {f} < 0" for ln, f in zip(lines, folds["fold"], strict=True) if f < 0
    ]
    if negative:
        raise RSNAFormatError(path, negative)
    if study_ids is not None:
        absent = sorted(set(study_ids) - set(folds["study_id"]))
        if absent:
            raise RSNAFormatError(
                path,
                [f"{len(absent)} studies have no fold, e.g. {absent[:5]}; remake the folds"],
            )
    return folds


def _has_source_columns(path: Path) -> bool:
    """Whether a folds.csv header names the source columns (read before the strict parse)."""
    try:
        with path.open(encoding="utf-8-sig") as fh:
            header = {h.strip() for h in fh.readline().split(",")}
    except OSError:
        return False  # the strict loader reports the missing file
    return set(SOURCE_COLUMNS) <= header
