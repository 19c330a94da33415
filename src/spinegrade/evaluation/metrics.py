"""The RSNA 2024 lumbar spine competition metric, exactly, with its four terms, and the baselines.

Score = mean of four terms (lower is better):
- ``spinal``, ``foraminal`` (left+right pooled), ``subarticular`` (left+right pooled): weighted
  log loss ``sum(w * -ln p_true) / sum(w)`` with sample weight 1/2/4 by the true class;
- ``any_severe_spinal``: per study, label 1 if any spinal level is Severe, prediction the max over
  levels of the submitted ``severe`` probability, weight the max sample weight of its spinal rows.

Predictions are aligned to the solution by row id; empty label cells are not scored. Rows need
not sum to 1, and the two kinds of term treat them as the host's code did (``sklearn.metrics.
log_loss`` with eps 1e-15): the three condition terms clip each row to ``[1e-15, 1 - 1e-15]`` and
then divide it by its sum; ``any_severe_spinal`` takes the submitted ``severe`` values as they are
(no renormalising), their max per study clipped to ``[1e-15, 1 - 1e-15]``. For rows that do sum
to 1 the two agree.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from spinegrade.evaluation import grades
from spinegrade.rsna.submission import submission_frame
from spinegrade.task import (
    CLASS_WEIGHTS,
    COLUMN_CONDITION,
    CONDITION_GROUP,
    GROUPS,
    LABEL_COLUMNS,
    PROB_COLUMNS,
    RSNA_2024,
    SEVERITY_INDEX,
    row_id,
)

EPS = 1e-15
TERMS: tuple[str, ...] = ("spinal", "foraminal", "subarticular", "any_severe_spinal")


class SubmissionError(ValueError):
    """A submission that cannot be scored (missing/extra rows, NaN, negative values)."""


def solution_long(labels_wide: pd.DataFrame) -> pd.DataFrame:
    """Labelled rows of a train.csv table: row_id, study_id, column, group, target, weight."""
    if "study_id" not in labels_wide.columns:
        raise ValueError("labels table has no study_id column")
    missing = [c for c in LABEL_COLUMNS if c not in labels_wide.columns]
    if missing:
        raise ValueError(f"labels table lacks label columns: {missing[:3]}...")
    long = labels_wide.melt(
        id_vars="study_id", value_vars=list(LABEL_COLUMNS), var_name="column", value_name="severity"
    )
    long = long[long["severity"].notna() & (long["severity"].astype(str) != "")]
    unknown = set(long["severity"]) - set(SEVERITY_INDEX)
    if unknown:
        raise ValueError(f"unknown severity values in labels: {sorted(map(str, unknown))}")
    out = pd.DataFrame(
        {
            "row_id": [row_id(s, c) for s, c in zip(long["study_id"], long["column"], strict=True)],
            "study_id": long["study_id"].astype(np.int64).to_numpy(),
            "column": long["column"].to_numpy(),
            "group": [CONDITION_GROUP[COLUMN_CONDITION[c]] for c in long["column"]],
            "target": long["severity"].map(SEVERITY_INDEX).astype(np.int64).to_numpy(),
        }
    )
    out["weight"] = np.asarray(CLASS_WEIGHTS)[out["target"].to_numpy()]
    return out.reset_index(drop=True)


def _check_submission(submission: pd.DataFrame, expected_ids: Iterable[str], strict: bool) -> None:
    cols = ["row_id", *PROB_COLUMNS]
    absent = [c for c in cols if c not in submission.columns]
    if absent:
        raise SubmissionError(f"submission lacks columns {absent}; expected {cols}")
    dup = submission["row_id"][submission["row_id"].duplicated()]
    if len(dup):
        raise SubmissionError(f"submission has duplicated row_id values, e.g. {dup.iloc[0]!r}")
    got, want = set(submission["row_id"]), set(expected_ids)
    lacking = sorted(want - got)
    if lacking:
        raise SubmissionError(
            f"submission is missing {len(lacking)} row(s), e.g. {lacking[0]!r}: "
            "every labelled (study, column) needs a row"
        )
    # Unlabelled cells of a labelled study are normal submission rows (Kaggle scores only the
    # labelled ones); rows of studies the labels do not know are an error in strict mode.
    studies = {rid.partition("_")[0] for rid in want}
    extra = sorted(r for r in got - want if str(r).partition("_")[0] not in studies)
    if strict and extra:
        raise SubmissionError(
            f"submission has {len(extra)} row(s) not in the labels, e.g. {extra[0]!r}: "
            "score only the studies of the labels file"
        )
    probs = submission[list(PROB_COLUMNS)].to_numpy(dtype=float)
    bad = ~np.isfinite(probs)
    if bad.any():
        r = submission["row_id"].iloc[int(np.argwhere(bad)[0][0])]
        raise SubmissionError(f"submission has NaN or infinite probabilities (row {r!r})")
    if (probs < 0).any():
        r = submission["row_id"].iloc[int(np.argwhere(probs < 0)[0][0])]
        raise SubmissionError(f"submission has negative probabilities (row {r!r})")
    if (probs.sum(axis=1) <= 0).any():
        r = submission["row_id"].iloc[int(np.argwhere(probs.sum(axis=1) <= 0)[0][0])]
        raise SubmissionError(f"submission row {r!r} has all-zero probabilities")


def _weighted_log_loss(p_true: np.ndarray, weight: np.ndarray) -> float:
    return float(np.sum(weight * -np.log(p_true)) / np.sum(weight))


def score_frames(
    labels_wide: pd.DataFrame, submission: pd.DataFrame, strict: bool = True
) -> dict[str, float]:
    """Score a submission (row_id + 3 probability columns) against train.csv-format labels.

    ``strict=False`` ignores submission rows whose study/column is not labelled (used for
    out-of-fold subsets); missing rows, NaN and negative values are always errors.
    Returns the four terms and ``score``.
    """
    sol = solution_long(labels_wide)
    if sol.empty:
        raise ValueError("labels table has no labelled cells to score")
    _check_submission(submission, sol["row_id"], strict=strict)
    sub = submission.set_index("row_id").loc[sol["row_id"], list(PROB_COLUMNS)]
    submitted = sub.to_numpy(dtype=float)
    probs = _condition_probs(submitted)
    target = sol["target"].to_numpy()
    weight = sol["weight"].to_numpy()
    p_true = probs[np.arange(len(sol)), target]

    result: dict[str, float] = {}
    for group in GROUPS:
        m = (sol["group"] == group).to_numpy()
        result[group] = _weighted_log_loss(p_true[m], weight[m]) if m.any() else float("nan")
    result["any_severe_spinal"] = _any_severe_term(sol, submitted[:, 2])
    result["score"] = float(np.nanmean([result[t] for t in TERMS]))
    return result


def _condition_probs(submitted: np.ndarray) -> np.ndarray:
    """(N, 3) rows as the three condition terms score them: clipped, then divided by their sum.

    This is the order of sklearn's multiclass ``log_loss`` that the host metric calls; a row
    such as (5, 5, 0) thus scores its third class at 1e-15 / (2 - 1e-15), not at 1e-15.
    """
    clipped = np.clip(submitted, EPS, 1 - EPS)
    return clipped / clipped.sum(axis=1, keepdims=True)


def _any_severe_term(sol: pd.DataFrame, severe: np.ndarray) -> float:
    """Binary weighted log loss of 'any spinal level Severe' per study.

    ``severe`` is the submitted severe column as it is, aligned with ``sol``: the host takes its
    max over the study's spinal rows without renormalising the rows, so a submission whose rows
    do not sum to 1 scores differently here than in the spinal term. The weight is the largest
    sample weight among the study's spinal rows (so a study with a severe level weighs 4).
    """
    m = (sol["group"] == "spinal").to_numpy()
    if not m.any():
        return float("nan")
    spinal = pd.DataFrame(
        {
            "study_id": sol["study_id"].to_numpy()[m],
            "is_severe": (sol["target"].to_numpy()[m] == 2).astype(float),
            "weight": sol["weight"].to_numpy()[m],
            "p_severe": severe[m],
        }
    )
    per = spinal.groupby("study_id").agg(
        y=("is_severe", "max"), w=("weight", "max"), p=("p_severe", "max")
    )
    # Raw values may be 0 or above 1 (rows need not sum to 1): clip as sklearn's binary log_loss.
    p = np.clip(per["p"].to_numpy(), EPS, 1 - EPS)
    y, w = per["y"].to_numpy(), per["w"].to_numpy()
    loss = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float(np.sum(w * loss) / np.sum(w))


def evaluate_files(submission_csv: Path | str, labels_csv: Path | str) -> dict[str, float]:
    """Read a submission CSV and a train.csv-format labels CSV and score them."""
    submission_csv, labels_csv = Path(submission_csv), Path(labels_csv)
    for p in (submission_csv, labels_csv):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file")
    try:
        sub = pd.read_csv(submission_csv)
    except Exception as exc:  # pandas raises several types for malformed CSVs
        raise SubmissionError(f"{submission_csv}: cannot read as CSV ({exc})") from exc
    labels = pd.read_csv(labels_csv, dtype={c: "string" for c in LABEL_COLUMNS})
    try:
        return score_frames(labels, sub)
    except SubmissionError as exc:
        raise SubmissionError(f"{submission_csv}: {exc}") from exc


# ----------------------------------------------------------------------------------- baselines


def constant_submission(study_ids: Iterable[int], column_probs: np.ndarray) -> pd.DataFrame:
    """A submission that predicts the same (25, 3) column probabilities for every study."""
    return submission_frame(dict.fromkeys((int(s) for s in study_ids), column_probs))


def uniform_submission(study_ids: Iterable[int]) -> pd.DataFrame:
    """1/3 for every class."""
    return constant_submission(study_ids, np.full((len(LABEL_COLUMNS), 3), 1 / 3))


def prior_probs(train_wide: pd.DataFrame, smoothing: float = 1.0) -> np.ndarray:
    """(25, 3) class frequencies per column, Laplace-smoothed so no class gets probability 0."""
    return grades.prior_probs(train_wide, RSNA_2024, smoothing)


def best_constant_probs(train_wide: pd.DataFrame, smoothing: float = 1.0) -> np.ndarray:
    """(25, 3) p ∝ weight x count: the constant that minimises the weighted log loss."""
    return grades.best_constant_probs(train_wide, RSNA_2024, smoothing)


def prior_submission(train_wide: pd.DataFrame, study_ids: Iterable[int]) -> pd.DataFrame:
    """Per-column class prior learned on ``train_wide``, predicted for ``study_ids``."""
    return constant_submission(study_ids, prior_probs(train_wide))


def best_constant_submission(train_wide: pd.DataFrame, study_ids: Iterable[int]) -> pd.DataFrame:
    """Best constant per column (p ∝ weight x count) learned on ``train_wide``."""
    return constant_submission(study_ids, best_constant_probs(train_wide))
