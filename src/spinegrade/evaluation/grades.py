"""Scores of a task graded condition by condition (``metric: grades``), and its baselines.

RSNA 2024 has its competition metric (:mod:`.metrics`). Other tasks (SPIDER's disc gradings, a
hospital's own Pfirrmann or Modic labels) are scored per condition, the way the disc-grading
literature reports them, on out-of-fold predictions:

- every condition: log loss (natural log, rows renormalised, clipped at 1e-15), balanced accuracy
  of the most probable grade, its exact accuracy, and the grade counts;
- ordinal conditions with three or more grades (Pfirrmann 1-5): quadratic-weighted kappa of the
  most probable grade (readers' agreement is reported the same way) and the share within one grade;
- binary conditions (absent / present): ROC AUC of P(present) (the last grade).

The table's shape is the submission's: ``row_id`` = ``{study_id}_{condition}_{level}`` and one
probability column per grade, named by the task (columns a condition lacks stay empty).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from spinegrade.rsna.tables import label_matrix
from spinegrade.task import RSNA_2024, Task, row_id

EPS = 1e-15


def prob_columns(task: Task) -> list[str]:
    """The probability columns of the task's tables: every condition's, first seen first."""
    return list(dict.fromkeys(col for c in task.conditions for col in c.columns))


def predictions_frame(probs_by_study: Mapping[int, np.ndarray], task: Task) -> pd.DataFrame:
    """Per-study ``(len(task.columns), task.n_classes)`` probabilities -> the table, sorted by
    row_id (the RSNA task: exactly :func:`spinegrade.rsna.submission.submission_frame`)."""
    if task is RSNA_2024:
        from spinegrade.rsna.submission import submission_frame

        return submission_frame(probs_by_study)
    names = prob_columns(task)
    rows: list[dict] = []
    for sid, probs in probs_by_study.items():
        for j, col in enumerate(task.columns):
            c = task.column_condition(col)
            row = {"row_id": row_id(int(sid), col)}
            row.update(dict.fromkeys(names, np.nan))
            row.update(zip(c.columns, map(float, probs[j, : len(c.grades)]), strict=True))
            rows.append(row)
    out = pd.DataFrame(rows, columns=["row_id", *names])
    return out.sort_values("row_id", kind="stable").reset_index(drop=True)


def constant_frame(study_ids: Iterable[int], column_probs: np.ndarray, task: Task) -> pd.DataFrame:
    """The same (columns, classes) probabilities for every study."""
    return predictions_frame(dict.fromkeys((int(s) for s in study_ids), column_probs), task)


def class_counts(wide: pd.DataFrame, task: Task) -> np.ndarray:
    """(columns, n_classes) grade counts per label column; grades a condition lacks stay 0."""
    codes = label_matrix(wide, task)
    counts = np.zeros((len(task.columns), task.n_classes))
    for k in range(task.n_classes):
        counts[:, k] = (codes == k).sum(axis=0)
    return counts


def _valid_classes(task: Task) -> np.ndarray:
    """(columns, n_classes) True where the column's condition has that grade."""
    mask = np.zeros((len(task.columns), task.n_classes), dtype=bool)
    for j, col in enumerate(task.columns):
        mask[j, : len(task.column_condition(col).grades)] = True
    return mask


def prior_probs(train_wide: pd.DataFrame, task: Task, smoothing: float = 1.0) -> np.ndarray:
    """(columns, n_classes) grade frequencies per column, Laplace-smoothed; 0 beyond a
    condition's grades."""
    counts = (class_counts(train_wide, task) + smoothing) * _valid_classes(task)
    return counts / counts.sum(axis=1, keepdims=True)


def best_constant_probs(train_wide: pd.DataFrame, task: Task, smoothing: float = 1.0) -> np.ndarray:
    """p proportional to class weight x count: the constant with the least weighted log loss (the
    prior where every class weighs the same)."""
    weights = np.zeros((len(task.columns), task.n_classes))
    for j, col in enumerate(task.columns):
        w = task.column_condition(col).class_weights
        weights[j, : len(w)] = w
    counts = (class_counts(train_wide, task) + smoothing) * weights
    return counts / counts.sum(axis=1, keepdims=True)


def uniform_probs(task: Task) -> np.ndarray:
    valid = _valid_classes(task).astype(float)
    return valid / valid.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------- scores


def _qwk(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Quadratic-weighted Cohen's kappa of two gradings on ``k`` ordered grades."""
    observed = np.zeros((k, k))
    np.add.at(observed, (y, pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(len(y), 1)
    idx = np.arange(k)
    weight = (idx[:, None] - idx[None, :]) ** 2 / (k - 1) ** 2
    denom = (weight * expected).sum()
    # A constant grading (or one grade in the truth) carries no agreement beyond chance: 0.
    return float(1.0 - (weight * observed).sum() / denom) if denom > 0 else 0.0


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC by ranks (ties count half); None without both classes."""
    pos, neg = score[y == 1], score[y == 0]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over the grades present in the truth of the share of that grade predicted right."""
    return float(np.mean([(pred[y == g] == g).mean() for g in np.unique(y)]))


def condition_scores(y: np.ndarray, probs: np.ndarray, ordinal: bool) -> dict:
    """The scores of one condition: true grades ``y`` (n,), probabilities ``probs`` (n, k)."""
    k = probs.shape[1]
    p = np.clip(probs, EPS, 1 - EPS)
    p = p / p.sum(axis=1, keepdims=True)
    pred = p.argmax(axis=1)
    out = {
        "n": len(y),
        "counts": np.bincount(y, minlength=k).astype(int).tolist(),
        "log_loss": float(-np.log(p[np.arange(len(y)), y]).mean()),
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "exact": float((pred == y).mean()),
    }
    if k == 2:
        out["roc_auc"] = _auc(y, p[:, 1])
    elif ordinal:
        out["qwk"] = _qwk(y, pred, k)
        out["within_one"] = float((np.abs(pred - y) <= 1).mean())
    return out


def score_grades(wide: pd.DataFrame, predictions: pd.DataFrame, task: Task) -> dict:
    """Per-condition scores of ``predictions`` (a :func:`predictions_frame`) against the graded
    cells of ``wide`` (train.csv rows); ``score`` = the mean of the conditions' log losses.

    Every graded cell must have a prediction row (an error names the first missing one).
    """
    codes = label_matrix(wide, task)
    by_row = predictions.set_index("row_id")
    conditions: dict[str, dict] = {}
    for i, c in enumerate(task.conditions):
        part = slice(i * len(task.levels), (i + 1) * len(task.levels))
        cols = task.columns[part]
        ys, ps = [], []
        for r, sid in enumerate(wide["study_id"].astype(int)):
            for col, y in zip(cols, codes[r, part], strict=True):
                if y < 0:
                    continue
                rid = row_id(sid, col)
                if rid not in by_row.index:
                    raise ValueError(f"no prediction for {rid} (a graded cell)")
                ys.append(int(y))
                ps.append(by_row.loc[rid, list(c.columns)].to_numpy(dtype=float))
        if ys:
            conditions[c.name] = condition_scores(np.array(ys), np.stack(ps), c.ordinal)
    losses = [s["log_loss"] for s in conditions.values()]
    return {"score": float(np.mean(losses)) if losses else None, "conditions": conditions}


def table_rows(scores: Mapping[str, dict], task: Task) -> list[dict]:
    """Rows for a printed table: one a condition and kind of prediction (``scores``: name ->
    :func:`score_grades` result, e.g. ``{"oof": ..., "prior": ..., "best_constant": ...}``)."""
    rows = []
    for c in task.conditions:
        for name, result in scores.items():
            s = (result or {}).get("conditions", {}).get(c.name)
            if s is None:
                continue
            rows.append({"condition": c.name, "predictor": name, **s})
    return rows


def format_table(oof: Mapping, baselines: Mapping) -> list[str]:
    """Text lines of a per-condition table: the model's out-of-fold scores beside the constant
    baselines (``cv.json``'s ``oof`` and ``baselines`` of a ``grades`` task)."""
    metrics = (
        ("log_loss", "log loss"), ("balanced_accuracy", "bal. acc"), ("exact", "exact"),
        ("qwk", "QWK"), ("within_one", "within 1"), ("roc_auc", "ROC AUC"),
    )  # fmt: skip
    lines = [
        f"{'condition':<18}{'predictor':<15}{'n':>5}" + "".join(f"{h:>10}" for _, h in metrics)
    ]
    predictors = {"OOF (model)": oof, **baselines}
    for name in oof.get("conditions", {}):
        for label, result in predictors.items():
            s = (result or {}).get("conditions", {}).get(name)
            if s is None:
                continue
            cells = "".join(
                f"{s[k]:>10.3f}" if isinstance(s.get(k), float) else f"{'-':>10}"
                for k, _ in metrics
            )
            lines.append(f"{name:<18}{label:<15}{s['n']:>5}{cells}")
    mean = "".join(f"  {label} {r['score']:.3f}" for label, r in predictors.items() if r)
    lines.append(f"mean log loss:{mean}")
    return lines
