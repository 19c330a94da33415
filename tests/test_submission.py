"""The one submission builder: row order, values by column, and the baselines built with it."""

from __future__ import annotations

import numpy as np

from spinegrade.evaluation.metrics import constant_submission
from spinegrade.rsna.submission import submission_frame
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, submission_row_ids


def test_submission_rows_follow_the_sample_submission_order() -> None:
    probs = {sid: np.tile([0.7, 0.2, 0.1], (25, 1)) for sid in (44036939, 4003253, 1000)}
    probs[1000][LABEL_COLUMNS.index("spinal_canal_stenosis_l4_l5")] = [0.1, 0.1, 0.8]
    sub = submission_frame(probs)
    assert list(sub.columns) == ["row_id", *PROB_COLUMNS]
    assert sub["row_id"].tolist() == submission_row_ids([1000, 4003253, 44036939])
    assert sub["row_id"].tolist() == sorted(sub["row_id"])  # the sample submission is sorted
    row = sub.set_index("row_id").loc["1000_spinal_canal_stenosis_l4_l5"]
    assert row.tolist() == [0.1, 0.1, 0.8]


def test_every_column_keeps_its_own_probabilities_and_numpy_ids_work() -> None:
    rng = np.random.default_rng(0)
    probs = {np.int64(s): rng.dirichlet([1, 1, 1], size=25) for s in (7, 12)}
    sub = submission_frame(probs).set_index("row_id")
    for sid, p in probs.items():
        for j, col in enumerate(LABEL_COLUMNS):
            assert sub.loc[f"{sid}_{col}"].tolist() == p[j].tolist()


def test_constant_baselines_are_built_by_the_same_function() -> None:
    column_probs = np.random.default_rng(1).dirichlet([2, 1, 1], size=25)
    const = constant_submission([30, 10, 20], column_probs)
    same = submission_frame({s: column_probs for s in (10, 20, 30)})
    assert const.equals(same)
