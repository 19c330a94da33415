"""What the phantom's truth scores: the raw true probabilities and the Bayes limit.

The phantom knows the class probabilities behind every label (``truth/{split}_true_probs.csv``),
so every score can be put beside the best any model can reach. The demo adds these numbers to
``cv.json`` after training; ``spinegrade evaluate --truth`` prints them beside a submission's score.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from spinegrade.phantom.labels import weighted_optimal
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS


def read_true_probs(path: str | Path) -> pd.DataFrame:
    """True probabilities (row_id + 3 columns) from one CSV, or from every ``*_true_probs.csv`` of
    a phantom data folder (its ``truth/``) or of the truth folder itself."""
    path = Path(path)
    if path.is_file():
        return pd.read_csv(path)
    if path.is_dir():
        folder = path / "truth" if (path / "truth").is_dir() else path
        files = sorted(folder.glob("*_true_probs.csv"))
        if files:
            return pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    raise FileNotFoundError(
        f"{path}: no true probabilities here; give a phantom data folder (with truth/), its "
        "truth/ folder or a *_true_probs.csv written by `spinegrade synth`"
    )


def truth_scores(labels: pd.DataFrame, true_probs: str | Path | pd.DataFrame) -> dict[str, dict]:
    """Scores of the phantom's truth on ``labels`` (wide, one row a study): ``true_probs`` (the raw
    true probabilities) and ``bayes_limit``; ``{}`` when the ``true_probs`` path does not exist.

    The metric weights rows 1/2/4 by their true class, so the submission with the lowest expected
    score is the true probabilities reweighted the same way: that is the Bayes limit. Rows of
    studies not in ``labels`` are ignored; a labelled study without truth is an error.
    """
    from spinegrade.evaluation.metrics import score_frames

    if not isinstance(true_probs, pd.DataFrame):
        if not Path(true_probs).exists():
            return {}
        true_probs = read_true_probs(true_probs)
    study_of = true_probs["row_id"].astype(str).str.split("_").str[0]
    studies = {str(s) for s in labels["study_id"]}
    lacking = sorted(studies - set(study_of))
    if lacking:
        raise ValueError(
            f"the truth has no probabilities for {len(lacking)} labelled studies (e.g. "
            f"{lacking[0]}): use the truth of the phantom these labels come from"
        )
    probs = true_probs[study_of.isin(studies)]
    best = probs.copy()
    best[list(PROB_COLUMNS)] = weighted_optimal(probs[list(PROB_COLUMNS)].to_numpy())
    return {
        "true_probs": score_frames(labels, probs, strict=False),
        "bayes_limit": score_frames(labels, best, strict=False),
    }


def truth_scores_files(labels_csv: str | Path, truth: str | Path) -> dict[str, dict]:
    """:func:`truth_scores` of a train.csv-format labels file and a truth CSV or folder."""
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise FileNotFoundError(f"{labels_csv}: no such file")
    labels = pd.read_csv(labels_csv, dtype={c: "string" for c in LABEL_COLUMNS})
    return truth_scores(labels, read_true_probs(truth))
