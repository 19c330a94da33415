"""RSNA CSV tables: strict loading, wide <-> long conversions, label matrices, coordinates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from label_factory import random_labels, write_csv, write_train
from spinegrade.rsna import (
    COORDINATE_COLUMNS,
    DISC_COORDINATE_COLUMNS,
    MISSING_LABEL,
    RSNAFormatError,
    coordinates_to_titles,
    join_labels_coordinates,
    label_matrix,
    load_coordinates,
    load_dataset,
    load_disc_coordinates,
    load_series_descriptions,
    load_train,
    long_to_wide,
    matrix_to_wide,
    normalize_coordinates,
    solution_table,
    wide_to_long,
)
from spinegrade.task import (
    CLASS_WEIGHTS,
    LABEL_COLUMNS,
    PROB_COLUMNS,
    SEVERITIES,
    row_id,
    submission_row_ids,
)


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    """A three-study train split (and a test split) in the RSNA layout."""
    ids = [11, 22, 33]
    codes = random_labels(3, seed=1)
    codes[2, 0] = MISSING_LABEL
    write_train(tmp_path / "train.csv", ids, codes)
    series = [
        [s, s * 10 + k, d]
        for s in ids
        for k, d in enumerate(("Sagittal T1", "Sagittal T2/STIR", "Axial T2"))
    ]
    write_csv(
        tmp_path / "train_series_descriptions.csv",
        ["study_id", "series_id", "series_description"],
        series,
    )
    coords = [
        [11, 111, 8, "Spinal Canal Stenosis", "L4/L5", 120.5, 200.25],
        [11, 110, 4, "Left Neural Foraminal Narrowing", "L5/S1", 90.0, 230.0],
        [22, 222, 17, "Right Subarticular Stenosis", "L1/L2", 160.0, 150.0],
        [33, 331, 9, "Spinal Canal Stenosis", "L1/L2", 100.0, 80.0],  # cell is empty in train.csv
    ]
    write_csv(tmp_path / "train_label_coordinates.csv", list(COORDINATE_COLUMNS), coords)
    (tmp_path / "test_images" / "44").mkdir(parents=True)
    (tmp_path / "test_images" / "55").mkdir()
    return tmp_path


# ------------------------------------------------------------------------------------------------
# Loading and validation
# ------------------------------------------------------------------------------------------------
def test_load_train_keeps_empty_cells_missing(tmp_path: Path) -> None:
    codes = random_labels(4)
    codes[1, 3] = MISSING_LABEL
    path = write_train(tmp_path / "train.csv", [5, 6, 7, 8], codes)
    wide = load_train(path)
    assert list(wide.columns) == ["study_id", *LABEL_COLUMNS]
    assert wide["study_id"].dtype == np.int64
    assert pd.isna(wide.loc[1, LABEL_COLUMNS[3]])
    assert set(wide[LABEL_COLUMNS[0]].dropna()) <= set(SEVERITIES)
    np.testing.assert_array_equal(label_matrix(wide), codes)


def test_unknown_label_names_file_line_column_and_value(tmp_path: Path) -> None:
    rows = [[1, *["Normal/Mild"] * 25], [2, *["Moderate"] * 25]]
    rows[1][7] = "Mild"  # not an RSNA grade
    path = tmp_path / "train.csv"
    write_csv(path, ["study_id", *LABEL_COLUMNS], [rows[0]])
    with path.open("a") as fh:  # a blank line: the error must still give the editor's line
        fh.write("\n" + ",".join(str(v) for v in rows[1]) + "\n")
    with pytest.raises(RSNAFormatError) as err:
        load_train(path)
    msg = str(err.value)
    assert str(path) in msg and "line 4" in msg
    assert f"column '{LABEL_COLUMNS[6]}'" in msg and "'Mild'" in msg
    assert err.value.path == path and len(err.value.problems) == 1


def test_byte_order_mark_and_quoted_newline_keep_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "train_series_descriptions.csv"
    text = (
        "\ufeffstudy_id,series_id,series_description\n"
        '1,10,"Sagittal\nT1"\n'  # a quoted field over lines 2-3, itself invalid
        "1,11,Axial T1\n"  # line 4: not one of the three series types
    )
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RSNAFormatError) as err:
        load_series_descriptions(path)
    assert [p.split(",")[0] for p in err.value.problems] == ["line 2", "line 4"]
    assert "'Axial T1'" in err.value.problems[1]


@pytest.mark.parametrize(
    "header",
    [
        ["study_id", *LABEL_COLUMNS[:-1]],  # one label column missing
        ["study_id", *LABEL_COLUMNS, "notes"],  # an extra column
        ["study_id", *LABEL_COLUMNS, "study_id"],  # a repeated column
    ],
)
def test_wrong_columns_name_file_and_expected_columns(tmp_path: Path, header: list[str]) -> None:
    path = write_csv(tmp_path / "train.csv", header, [[1] * len(header)])
    with pytest.raises(RSNAFormatError, match="columns must be exactly") as err:
        load_train(path)
    assert str(path) in str(err.value) and LABEL_COLUMNS[-1] in str(err.value)


def test_coordinate_validation(tmp_path: Path) -> None:
    rows = [
        [1, 10, 3, "Spinal Canal Stenosis", "L1/L2", 10.5, 20.0],
        [1, 10, 3.5, "Spinal Canal Stenosis", "L2/L3", 10.5, 20.0],  # fractional instance
        [1, 10, 4, "spinal_canal_stenosis", "L3/L4", 10.5, 20.0],  # snake_case in the file
        [1, 10, 5, "Spinal Canal Stenosis", "L6/S1", 10.5, 20.0],  # no such level
        [1, 10, 6, "Spinal Canal Stenosis", "L4/L5", "abc", None],  # bad and empty coordinate
    ]
    path = write_csv(tmp_path / "train_label_coordinates.csv", list(COORDINATE_COLUMNS), rows)
    with pytest.raises(RSNAFormatError) as err:
        load_coordinates(path)
    problems = err.value.problems
    assert len(problems) == 5
    assert any(p.startswith("line 3, column 'instance_number'") and "'3.5'" in p for p in problems)
    assert any(p.startswith("line 4, column 'condition'") for p in problems)
    assert any(p.startswith("line 5, column 'level'") and "'L6/S1'" in p for p in problems)
    assert any(p.startswith("line 6, column 'x'") for p in problems)
    assert any(p.startswith("line 6, column 'y'") and "empty" in p for p in problems)
    good = load_coordinates(write_csv(tmp_path / "ok.csv", list(COORDINATE_COLUMNS), rows[:1]))
    assert good.dtypes["instance_number"] == np.int64 and good.loc[0, "x"] == 10.5


def test_disc_coordinates_load_and_name_their_problems(tmp_path: Path) -> None:
    """Disc centres: the coordinates' level spelling, no condition, one point per series level."""
    header = list(DISC_COORDINATE_COLUMNS)
    good = [[5_100_000_005, 5_200_000_005, 2, "L4/L5", 130.14, 236.5]]
    table = load_disc_coordinates(write_csv(tmp_path / "ok.csv", header, good))
    assert list(table.columns) == header
    assert table.loc[0, "study_id"] == 5_100_000_005 and table.loc[0, "level"] == "L4/L5"
    assert table.dtypes["instance_number"] == np.int64 and table.loc[0, "y"] == 236.5
    bad = [
        *good,
        [5_100_000_005, 5_200_000_005, 2, "l3_l4", 1.0, 2.0],  # snake_case level
        [5_100_000_005, 5_200_000_005, 2, "L2/L3", 1.0, ""],  # empty row coordinate
    ]
    with pytest.raises(RSNAFormatError) as err:
        load_disc_coordinates(write_csv(tmp_path / "bad.csv", header, bad))
    problems = err.value.problems
    assert len(problems) == 2 and "bad.csv" in str(err.value)
    assert problems[0].startswith("line 3, column 'level'") and "'l3_l4'" in problems[0]
    assert problems[1].startswith("line 4, column 'y'") and "empty" in problems[1]
    with pytest.raises(RSNAFormatError, match="line 3: duplicate"):
        load_disc_coordinates(write_csv(tmp_path / "dup.csv", header, good * 2))
    with_condition = ["condition", *header]
    rows = [["Spinal Canal Stenosis", *good[0]]]
    with pytest.raises(RSNAFormatError, match="columns must be exactly"):
        load_disc_coordinates(write_csv(tmp_path / "cond.csv", with_condition, rows))


def test_duplicates_are_errors(tmp_path: Path) -> None:
    header = ["study_id", "series_id", "series_description"]
    rows = [[1, 10, "Sagittal T1"], [1, 11, "Axial T2"], [1, 10, "Axial T2"]]
    with pytest.raises(RSNAFormatError, match="line 4: duplicate"):
        load_series_descriptions(write_csv(tmp_path / "s.csv", header, rows))
    codes = random_labels(2)
    path = write_train(tmp_path / "train.csv", [7, 7], codes)
    with pytest.raises(RSNAFormatError, match="line 3: duplicate"):
        load_train(path)


def test_load_dataset_train_and_test(dataset_dir: Path) -> None:
    train = load_dataset(dataset_dir)
    assert train.study_ids == [11, 22, 33]
    assert len(train.series) == 9 and len(train.coordinates) == 4
    assert train.series_dir(11, 110) == dataset_dir / "train_images" / "11" / "110"
    test = load_dataset(dataset_dir, split="test")
    assert test.series is None and test.labels is None and test.coordinates is None
    assert test.study_ids == [44, 55]  # from the image folders
    write_csv(
        dataset_dir / "test_series_descriptions.csv",
        ["study_id", "series_id", "series_description"],
        [[44, 1, "Axial T2"], [44, 2, "Sagittal T1"]],
    )
    assert load_dataset(dataset_dir, split="test").study_ids == [44]
    with pytest.raises(ValueError, match="split"):
        load_dataset(dataset_dir, split="valid")


def test_load_dataset_checks_links(dataset_dir: Path) -> None:
    coord_path = dataset_dir / "train_label_coordinates.csv"
    with coord_path.open("a") as fh:
        fh.write("22,999,1,Spinal Canal Stenosis,L2/L3,1.0,2.0\n")  # line 6: unknown series
    with pytest.raises(RSNAFormatError, match="line 6") as err:
        load_dataset(dataset_dir)
    assert err.value.path == coord_path and "999" in str(err.value)
    coord_path.unlink()
    assert load_dataset(dataset_dir).coordinates is None
    with (dataset_dir / "train_series_descriptions.csv").open("a") as fh:
        fh.write("77,1,Axial T2\n")  # a study that train.csv does not grade
    with pytest.raises(RSNAFormatError, match=r"line 11.*not in train\.csv"):
        load_dataset(dataset_dir)


def test_missing_file_says_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train\.csv"):
        load_dataset(tmp_path)


# ------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------
def test_wide_long_round_trip() -> None:
    codes = random_labels(6, seed=3)
    codes[4, :] = MISSING_LABEL  # a study without any grade
    wide = matrix_to_wide([9, 3, 7, 1, 5, 2], codes)
    long_all = wide_to_long(wide, dropna=False)
    assert len(long_all) == 6 * 25 and long_all["row_id"].is_unique
    first = long_all.iloc[1]
    assert (first["study_id"], first["condition"], first["level"]) == (
        9,
        "spinal_canal_stenosis",
        "l2_l3",
    )
    assert pd.isna(first["side"]) and long_all.iloc[25 + 5]["side"] == "left"
    assert first["row_id"] == row_id(9, first["column"])
    pd.testing.assert_frame_equal(long_to_wide(long_all), wide)
    long = wide_to_long(wide)
    assert len(long) == int((codes != MISSING_LABEL).sum()) and long["severity"].notna().all()
    pd.testing.assert_frame_equal(long_to_wide(long, study_ids=wide["study_id"]), wide)
    # Keys from (condition, level) alone give the same table.
    by_keys = long.drop(columns=["column", "row_id"])
    pd.testing.assert_frame_equal(long_to_wide(by_keys, study_ids=wide["study_id"]), wide)


def test_long_to_wide_rejects_repeats_and_unknown_keys() -> None:
    long = wide_to_long(matrix_to_wide([1], random_labels(1)))
    with pytest.raises(ValueError, match=r"repeated .* study 1"):
        long_to_wide(pd.concat([long, long.iloc[:1]]))
    bad = long.drop(columns=["column"]).assign(level="l6_s1")
    with pytest.raises(ValueError, match="unknown"):
        long_to_wide(bad)


def test_label_matrix_round_trip_and_errors() -> None:
    codes = random_labels(20, seed=4)
    wide = matrix_to_wide(np.arange(20) + 100, codes)
    np.testing.assert_array_equal(label_matrix(wide), codes)
    assert label_matrix(wide).dtype == np.int64
    wide.loc[3, LABEL_COLUMNS[9]] = "severe"  # wrong case
    with pytest.raises(ValueError, match=f"study 103, column {LABEL_COLUMNS[9]}.*'severe'"):
        label_matrix(wide)
    with pytest.raises(ValueError, match="-1"):
        matrix_to_wide([1], np.full((1, 25), 3))


def test_solution_table_one_hot_sorted_weighted() -> None:
    codes = random_labels(5, seed=5)
    codes[0, 10] = MISSING_LABEL
    wide = matrix_to_wide([50, 40, 30, 20, 10], codes)
    sol = solution_table(wide, include_weight=True)
    assert list(sol.columns) == ["row_id", *PROB_COLUMNS, "sample_weight"]
    assert len(sol) == int((codes != MISSING_LABEL).sum())
    assert row_id(50, LABEL_COLUMNS[10]) not in set(sol["row_id"])
    # Same order as the sample submission, which sorts row ids as strings.
    expected = [r for r in submission_row_ids([50, 40, 30, 20, 10]) if r in set(sol["row_id"])]
    assert sol["row_id"].tolist() == expected
    np.testing.assert_array_equal(sol[list(PROB_COLUMNS)].sum(axis=1), 1.0)
    one = sol.set_index("row_id").loc[row_id(30, LABEL_COLUMNS[7])]
    k = codes[2, 7]
    assert one[PROB_COLUMNS[k]] == 1.0 and one["sample_weight"] == CLASS_WEIGHTS[k]
    assert "sample_weight" not in solution_table(wide).columns


def test_coordinates_vocabulary_round_trip(dataset_dir: Path) -> None:
    coords = load_coordinates(dataset_dir / "train_label_coordinates.csv")
    norm = normalize_coordinates(coords)
    assert norm.loc[1, "condition"] == "left_neural_foraminal_narrowing"
    assert norm.loc[1, "level"] == "l5_s1" and norm.loc[1, "side"] == "left"
    assert norm.loc[1, "row_id"] == "11_left_neural_foraminal_narrowing_l5_s1"
    pd.testing.assert_frame_equal(coordinates_to_titles(norm), coords)


def test_join_labels_and_coordinates(dataset_dir: Path) -> None:
    ds = load_dataset(dataset_dir)
    inner = join_labels_coordinates(ds.labels, ds.coordinates, series=ds.series)
    # Study 33's point marks a cell that train.csv leaves empty: not in the inner join.
    assert sorted(inner["row_id"]) == [
        "11_left_neural_foraminal_narrowing_l5_s1",
        "11_spinal_canal_stenosis_l4_l5",
        "22_right_subarticular_stenosis_l1_l2",
    ]
    row = inner.set_index("row_id").loc["11_spinal_canal_stenosis_l4_l5"]
    assert row["severity"] == ds.labels.set_index("study_id").loc[11, "spinal_canal_stenosis_l4_l5"]
    assert (row["instance_number"], row["x"], row["series_description"]) == (
        8,
        120.5,
        "Sagittal T2/STIR",
    )
    left = join_labels_coordinates(ds.labels, ds.coordinates, how="left")
    assert len(left) == len(wide_to_long(ds.labels)) and left["x"].notna().sum() == 3
    right = join_labels_coordinates(ds.labels, ds.coordinates, how="right")
    orphan = right.set_index("row_id").loc["33_spinal_canal_stenosis_l1_l2"]
    assert pd.isna(orphan["severity"]) and orphan["condition"] == "spinal_canal_stenosis"
