"""Which series a study is read from when it holds duplicates (one of them truncated)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spinegrade.data.studies import load_studies, select_stacks, series_coverage, used_series
from spinegrade.reporting.report import StudyPrediction, grades_payload
from stack_factory import truncated_copy, world_stacks, write_world

T2, T1, AX = "Sagittal T2/STIR", "Sagittal T1", "Axial T2"


def _study_with_duplicates():
    full_t2, t1, full_ax = world_stacks(7, np.zeros(25, dtype=int))
    short_t2 = truncated_copy(full_t2, 60, slice(3, 7))  # lower id: "first series" would pick it
    short_ax = truncated_copy(full_ax, 50, slice(0, 12))
    return [short_ax, short_t2, full_t2, t1, full_ax], full_t2, short_t2, full_ax, short_ax


def test_prediction_reads_the_best_covering_series():
    stacks, full_t2, short_t2, full_ax, short_ax = _study_with_duplicates()
    assert series_coverage([full_t2]) > series_coverage([short_t2]) > 0
    chosen = select_stacks(stacks)
    assert [s.series_id for s in chosen[T2]] == [full_t2.series_id]  # one sagittal series
    assert [s.series_id for s in chosen[AX]] == [full_ax.series_id, short_ax.series_id]
    assert used_series(chosen) == {T2: [71], T1: [72], AX: [73, 50]}


def test_training_reads_the_series_the_coordinates_were_labelled_on():
    stacks, _, short_t2, full_ax, short_ax = _study_with_duplicates()
    chosen = select_stacks(stacks, labelled=[short_t2.series_id, short_ax.series_id])
    assert [s.series_id for s in chosen[T2]] == [short_t2.series_id]
    assert [s.series_id for s in chosen[AX]] == [short_ax.series_id, full_ax.series_id]
    # A description with no labelled series falls back to the best-covering one.
    assert [s.series_id for s in chosen[T1]] == [72]


def test_load_studies_and_the_report_name_the_series_used(tmp_path):
    from spinegrade.rsna import load_coordinates, normalize_coordinates

    data, cache = write_world(tmp_path, n_studies=2, duplicates=True)
    labels = pd.read_csv(data / "train.csv")
    coords = normalize_coordinates(load_coordinates(data / "train_label_coordinates.csv"))
    ids = labels["study_id"].tolist()
    train = load_studies(cache, ids, labels, coords, progress=False)
    new = load_studies(cache, ids, progress=False)  # prediction: no coordinates
    for sid in ids:
        labelled = set(coords.loc[coords["study_id"] == sid, "series_id"])
        for chosen in (train[sid].stacks, new[sid].stacks):
            assert chosen[T2][0].series_id in labelled and len(chosen[T2]) == 1
            assert chosen[AX][0].series_id in labelled and len(chosen[AX]) == 2
        # The true points of training still come from the labelled slices.
        assert np.isfinite(train[sid].points.xyz).all()
    series = used_series(new[ids[0]].stacks)
    pred = StudyPrediction(ids[0], np.full((25, 3), 1 / 3), ["model"] * 25, series=series)
    assert grades_payload(pred)["series"] == {T2: [10001], T1: [10002], AX: [10003, 9998]}
