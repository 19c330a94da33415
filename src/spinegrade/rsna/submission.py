"""The submission table: per-study (25, 3) probabilities -> Kaggle's ``row_id`` + 3 columns.

One builder for every table in submission format: prediction's ``submission.csv``, the
out-of-fold ``oof.csv`` of cross-validation and the constant baselines of :mod:`.metrics`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, split_row_id, submission_row_ids

_COLUMN_INDEX: dict[str, int] = {c: j for j, c in enumerate(LABEL_COLUMNS)}


def submission_frame(probs_by_study: Mapping[int, np.ndarray]) -> pd.DataFrame:
    """25 rows a study (row_id, normal_mild, moderate, severe) in the sample submission's order.

    ``probs_by_study`` maps a study id to its (25, 3) probabilities in ``LABEL_COLUMNS`` order.
    """
    rows = submission_row_ids([int(s) for s in probs_by_study])
    by_study = {int(s): p for s, p in probs_by_study.items()}
    values = np.empty((len(rows), len(PROB_COLUMNS)))
    for i, rid in enumerate(rows):
        study, column = split_row_id(rid)
        values[i] = by_study[study][_COLUMN_INDEX[column]]
    out = pd.DataFrame(values, columns=list(PROB_COLUMNS))
    out.insert(0, "row_id", rows)
    return out
