"""The RSNA 2024 CSV tables: strict loading, wide <-> long conversions, label matrices.

Tables are returned in the file's own vocabulary (``Normal/Mild``, ``Spinal Canal Stenosis``,
``L4/L5``); the conversions below map them onto the package vocabulary of
:mod:`spinegrade.task` (snake_case conditions and levels, the 25 label columns, row ids).
Every loader checks exact columns and known strings and reports the file, the line number as a
text editor shows it (header = line 1), the column and the offending value.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spinegrade.task import (
    CLASS_WEIGHTS,
    COLUMN_CONDITION,
    COLUMN_LEVEL,
    CONDITION_SIDE,
    CONDITION_TITLES,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    PHANTOM_GENERATOR,
    PROB_COLUMNS,
    RSNA_2024,
    SERIES_DESCRIPTIONS,
    SEVERITIES,
    SEVERITY_INDEX,
    TITLE_TO_CONDITION,
    TITLE_TO_LEVEL,
    Task,
    dataset_task,
    row_id,
)

TRAIN_COLUMNS: tuple[str, ...] = ("study_id", *LABEL_COLUMNS)
SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id",
    "series_id",
    "instance_number",
    "condition",
    "level",
    "x",
    "y",
)
LONG_COLUMNS: tuple[str, ...] = (
    "study_id",
    "condition",
    "side",
    "level",
    "severity",
    "column",
    "row_id",
)
MISSING_LABEL = -1  # integer code of an empty label cell in label matrices
_MAX_REPORTED = 20  # problems listed in one error message; the count says how many there were


class RSNAFormatError(ValueError):
    """A CSV does not follow the RSNA 2024 format; ``problems`` lists every finding."""

    # What the file is and how to get out; subclasses for other sources' CSVs change these.
    kind = "RSNA CSV"
    fix = "fix the file (or regenerate it) and retry"

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        shown = "\n  ".join(self.problems[:_MAX_REPORTED])
        more = len(self.problems) - _MAX_REPORTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(
            f"{self.path}: {len(self.problems)} problem(s) with this {self.kind}; "
            f"{self.fix}:\n  {shown}{tail}"
        )


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------
Parser = Callable[[str], Any]  # raises ValueError with a reason on a bad cell


def _int_cell(text: str) -> int:
    if not text:
        raise ValueError("empty cell, an integer is required")
    digits = text[1:] if text[0] in "+-" else text
    if not (digits.isascii() and digits.isdigit()):  # int() would also take "1_000" or " 7"
        raise ValueError("not an integer")
    return int(text)


def _float_cell(text: str) -> float:
    if not text:
        raise ValueError("empty cell, a number is required")
    try:
        value = float(text)
    except ValueError:
        raise ValueError("not a number") from None
    if not np.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _choice_cell(allowed: Sequence[str], nullable: bool) -> Parser:
    allowed_set = frozenset(allowed)
    expected = f"expected one of {list(allowed)}" + (" or an empty cell" if nullable else "")

    def parse(text: str) -> str | None:
        if not text and nullable:
            return None  # an empty label cell: the grade was not given, it is not Normal
        if text not in allowed_set:
            raise ValueError(f"unknown value, {expected}")
        return text

    return parse


_SEVERITY_CELL = _choice_cell(SEVERITIES, nullable=True)
TRAIN_PARSERS: dict[str, Parser] = {
    "study_id": _int_cell,
    **dict.fromkeys(LABEL_COLUMNS, _SEVERITY_CELL),
}
SERIES_PARSERS: dict[str, Parser] = {
    "study_id": _int_cell,
    "series_id": _int_cell,
    "series_description": _choice_cell(SERIES_DESCRIPTIONS, nullable=False),
}
COORDINATE_PARSERS: dict[str, Parser] = {
    "study_id": _int_cell,
    "series_id": _int_cell,
    "instance_number": _int_cell,  # the DICOM InstanceNumber, not a 0-based slice index
    "condition": _choice_cell(tuple(CONDITION_TITLES.values()), nullable=False),
    "level": _choice_cell(tuple(LEVEL_TITLES.values()), nullable=False),
    "x": _float_cell,  # image column, pixels
    "y": _float_cell,  # image row, pixels
}
# Disc centres of sagittal series (train_disc_coordinates.csv, e.g. from `spinegrade import
# spider`): kept apart from train_label_coordinates.csv, whose conditions are RSNA's five only.
DISC_COORDINATE_PARSERS: dict[str, Parser] = {
    name: COORDINATE_PARSERS[name]
    for name in ("study_id", "series_id", "instance_number", "level", "x", "y")
}
DISC_COORDINATE_COLUMNS: tuple[str, ...] = tuple(DISC_COORDINATE_PARSERS)


def _read_rows(
    path: Path, expected: Sequence[str], extra_ok: bool = False
) -> tuple[list[int], dict[str, list[str]]]:
    """Read a CSV into stripped string columns plus the editor line number of every record.

    ``extra_ok`` accepts columns beyond ``expected`` (other sources' tables carry more than the
    importer needs); missing or repeated columns are always an error.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; point spinegrade at an RSNA data folder")
    # utf-8-sig: spreadsheets often save a byte-order mark that would corrupt the first header.
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in expected if c not in header]
        repeated = [c for i, c in enumerate(header) if c in header[:i]]
        if extra_ok and (missing or repeated):
            raise RSNAFormatError(
                path,
                [
                    f"line 1: missing columns {missing}, repeated {repeated}; the file needs "
                    f"the columns {list(expected)} (any order, others are kept)"
                ],
            )
        if not extra_ok and sorted(header) != sorted(expected):
            extra = [c for i, c in enumerate(header) if c not in expected or c in header[:i]]
            raise RSNAFormatError(
                path,
                [
                    f"line 1: missing columns {missing}, unexpected or repeated {extra}; "
                    f"the columns must be exactly {list(expected)} (any order)"
                ],
            )
        lines: list[int] = []
        rows: list[list[str]] = []
        problems: list[str] = []
        last = reader.line_num
        for record in reader:
            start, last = last + 1, reader.line_num  # a quoted field may span several lines
            if all(not cell.strip() for cell in record):
                continue  # blank line
            if len(record) != len(header):
                problems.append(f"line {start}: {len(record)} fields, header has {len(header)}")
                continue
            lines.append(start)
            rows.append([cell.strip() for cell in record])
    if problems:
        raise RSNAFormatError(path, problems)
    return lines, {name: [r[i] for r in rows] for i, name in enumerate(header)}


def _load(
    path: Path | str,
    parsers: dict[str, Parser],
    unique: list[str] | None = None,
    extra_ok: bool = False,
) -> tuple[pd.DataFrame, list[int]]:
    """Parse every cell of ``path``; all bad cells are reported at once. Returns (table, lines).

    With ``extra_ok`` columns without a parser are kept as text, in the file's column order.
    """
    path = Path(path)
    lines, raw = _read_rows(path, tuple(parsers), extra_ok)
    problems: list[tuple[int, int, str]] = []  # (line, column index, message) for sorting
    data: dict[str, list[Any]] = {}
    for col, (name, parse) in enumerate(parsers.items()):
        parsed: list[Any] = []
        for line, text in zip(lines, raw[name], strict=True):
            try:
                parsed.append(parse(text))
            except ValueError as err:
                msg = f"line {line}, column '{name}': value {text!r}: {err}"
                problems.append((line, col, msg))
                parsed.append(None)
        data[name] = parsed
    if problems:
        raise RSNAFormatError(path, [msg for _, _, msg in sorted(problems)])
    columns = list(raw) if extra_ok else list(parsers)
    frame = pd.DataFrame({name: data.get(name, raw[name]) for name in columns}, columns=columns)
    ints = [name for name, parse in parsers.items() if parse is _int_cell]
    frame = frame.astype(dict.fromkeys(ints, "int64"))
    if unique:
        dup = np.flatnonzero(frame.duplicated(unique, keep="first").to_numpy())
        if len(dup):
            raise RSNAFormatError(
                path,
                [f"line {lines[i]}: duplicate {frame.loc[i, unique].to_dict()}" for i in dup],
            )
    return frame, lines


def train_parsers(task: Task = RSNA_2024) -> dict[str, Parser]:
    """train.csv's cell parsers for ``task``: each column takes its condition's grade names."""
    if task is RSNA_2024:
        return TRAIN_PARSERS
    parsers: dict[str, Parser] = {"study_id": _int_cell}
    for c in task.conditions:
        parsers.update(dict.fromkeys(task.condition_columns(c.name), _choice_cell(c.grades, True)))
    return parsers


def load_train(path: Path | str, task: Task = RSNA_2024) -> pd.DataFrame:
    """Load ``train.csv``: ``study_id`` (int) + the task's label columns (the 25 RSNA ones by
    default; grade names as strings, NaN where empty)."""
    return _load(path, train_parsers(task), ["study_id"])[0]


def load_series_descriptions(path: Path | str) -> pd.DataFrame:
    """Load ``{train,test}_series_descriptions.csv`` (ints + one of the three series types)."""
    return _load(path, SERIES_PARSERS, ["study_id", "series_id"])[0]


def load_coordinates(path: Path | str) -> pd.DataFrame:
    """Load ``train_label_coordinates.csv`` in its own vocabulary (Title Case, ``L1/L2``)."""
    return _load(path, COORDINATE_PARSERS)[0]


def load_disc_coordinates(path: Path | str) -> pd.DataFrame:
    """Load ``train_disc_coordinates.csv``: one disc centre per (study, series, level).

    Columns study_id, series_id, instance_number, level (``L1/L2`` ... ``L5/S1``, as in the
    label coordinates), x, y (column and row in that instance's pixel grid).
    """
    return _load(path, DISC_COORDINATE_PARSERS, ["study_id", "series_id", "level"])[0]


@dataclass
class RSNADataset:
    """The CSV tables of one split of an RSNA data folder (test: series descriptions only)."""

    root: Path
    split: str
    series: pd.DataFrame | None
    labels: pd.DataFrame | None = None  # wide train.csv table
    coordinates: pd.DataFrame | None = None
    task: Task = RSNA_2024  # what train.csv grades (the folder's task.yaml)

    @property
    def image_dir(self) -> Path:
        return self.root / f"{self.split}_images"

    def series_dir(self, study_id: int, series_id: int) -> Path:
        """Folder holding the DICOM files of one series."""
        return self.image_dir / str(study_id) / str(series_id)

    @property
    def study_ids(self) -> list[int]:
        """Studies of the split: labelled ones, else those with series, else image folders."""
        if self.labels is not None:
            return [int(s) for s in self.labels["study_id"]]
        if self.series is not None:
            return [int(s) for s in pd.unique(self.series["study_id"])]
        if not self.image_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.image_dir.iterdir() if p.name.isdigit())


def is_phantom(data_dir: Path | str) -> bool:
    """Whether ``data_dir`` is a finished ``spinegrade synth`` dataset (``truth/phantom.json``)."""
    meta = Path(data_dir) / "truth" / "phantom.json"
    try:
        return json.loads(meta.read_text()).get("generator") == PHANTOM_GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def load_dataset(data_dir: Path | str, split: str = "train") -> RSNADataset:
    """Load and cross-check the CSVs of ``split`` ("train" or "test") under ``data_dir``.

    Train needs ``train.csv`` and ``train_series_descriptions.csv``; a missing
    ``train_label_coordinates.csv`` gives ``coordinates=None``. Test has no labels; a missing
    ``test_series_descriptions.csv`` gives ``series=None`` (study ids then come from the folders).
    """
    root = Path(data_dir)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    series_path = root / f"{split}_series_descriptions.csv"
    if split == "test":
        series = load_series_descriptions(series_path) if series_path.is_file() else None
        return RSNADataset(root=root, split=split, series=series)
    task = dataset_task(root)
    labels = load_train(root / "train.csv", task)
    series, series_lines = _load(series_path, SERIES_PARSERS, ["study_id", "series_id"])
    orphans = _unknown_keys(series, ["study_id"], labels, series_lines, "train.csv")
    if orphans:
        raise RSNAFormatError(series_path, orphans)
    coord_path = root / "train_label_coordinates.csv"
    coords = None
    if coord_path.is_file():
        coords, coord_lines = _load(coord_path, COORDINATE_PARSERS)
        keys = ["study_id", "series_id"]
        bad = _unknown_keys(coords, keys, series, coord_lines, series_path.name)
        if bad:
            raise RSNAFormatError(coord_path, bad)
    return RSNADataset(
        root=root, split=split, series=series, labels=labels, coordinates=coords, task=task
    )


def _unknown_keys(
    table: pd.DataFrame, keys: list[str], reference: pd.DataFrame, lines: list[int], ref_name: str
) -> list[str]:
    """Problems for rows of ``table`` whose ``keys`` do not occur in ``reference``."""
    known = set(reference[keys].itertuples(index=False, name=None))
    rows = table[keys].itertuples(index=False, name=None)
    return [
        f"line {line}: {dict(zip(keys, key, strict=True))} is not in {ref_name}"
        for line, key in zip(lines, rows, strict=True)
        if key not in known
    ]


# ---------------------------------------------------------------------------------------------
# Wide <-> long, label matrices, the metric's solution rows
# ---------------------------------------------------------------------------------------------
def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing}; has {list(frame.columns)}")


def label_matrix(wide: pd.DataFrame, task: Task = RSNA_2024) -> np.ndarray:
    """Integer labels (n_studies x the task's columns, train.csv row order): the grade's index
    in its condition (0/1/2 by severity for RSNA), -1 where empty."""
    columns = list(task.columns)
    _require_columns(wide, ["study_id", *columns], "wide label table")
    cells = wide[columns].to_numpy(dtype=object)
    codes = np.full(cells.shape, MISSING_LABEL, dtype=np.int64)
    missing = pd.isna(cells)
    for i, condition in enumerate(task.conditions):
        part = slice(i * len(task.levels), (i + 1) * len(task.levels))
        for code, grade in enumerate(condition.grades):
            codes[:, part][cells[:, part] == grade] = code
    bad = np.argwhere((codes == MISSING_LABEL) & ~missing)
    if len(bad):
        r, c = bad[0]
        grades = list(task.column_condition(columns[c]).grades)
        raise ValueError(
            f"study {wide['study_id'].iloc[r]}, column {columns[c]}: unknown grade "
            f"{cells[r, c]!r} ({len(bad)} bad cell(s)); expected one of {grades} or empty"
        )
    return codes


def matrix_to_wide(
    study_ids: Sequence[int] | np.ndarray, labels: np.ndarray, task: Task = RSNA_2024
) -> pd.DataFrame:
    """Inverse of :func:`label_matrix`: a train.csv-shaped table (NaN where the code is -1)."""
    labels = np.asarray(labels)
    columns = list(task.columns)
    if labels.shape != (len(study_ids), len(columns)):
        raise ValueError(f"labels must be ({len(study_ids)}, {len(columns)}), got {labels.shape}")
    cells = np.empty(labels.shape, dtype=object)
    for i, condition in enumerate(task.conditions):
        part = slice(i * len(task.levels), (i + 1) * len(task.levels))
        if not np.isin(labels[:, part], (MISSING_LABEL, *range(len(condition.grades)))).all():
            codes = ", ".join(str(k) for k in range(len(condition.grades)))
            raise ValueError(f"{condition.name} labels must hold only -1 (missing), {codes}")
        names = np.array((*condition.grades, None), dtype=object)  # -1 picks the trailing None
        cells[:, part] = names[labels[:, part]]
    frame = pd.DataFrame(cells, columns=columns)
    frame.insert(0, "study_id", np.asarray(study_ids, dtype=np.int64))
    return frame


def _derived_keys(columns: pd.Series) -> dict[str, list[Any]]:
    conditions = [COLUMN_CONDITION[c] for c in columns]
    return {
        "condition": conditions,
        "side": [CONDITION_SIDE[c] for c in conditions],  # None for the central spinal canal
        "level": [COLUMN_LEVEL[c] for c in columns],
    }


def wide_to_long(wide: pd.DataFrame, dropna: bool = True) -> pd.DataFrame:
    """One row per (study, label column), study-major in the 25-column order.

    Columns: study_id, condition, side, level, severity, column, row_id (snake_case vocabulary).
    ``dropna`` drops empty cells, which the metric does not score.
    """
    codes = label_matrix(wide)  # validates every cell
    n_cols = len(LABEL_COLUMNS)
    columns = pd.Series(np.tile(np.array(LABEL_COLUMNS, dtype=object), len(wide)))
    long = pd.DataFrame({"study_id": np.repeat(wide["study_id"].to_numpy(dtype=np.int64), n_cols)})
    for name, values in _derived_keys(columns).items():
        long[name] = values
    long["severity"] = wide[list(LABEL_COLUMNS)].to_numpy(dtype=object).ravel()
    long["column"] = columns.to_numpy()
    long["row_id"] = [row_id(s, c) for s, c in zip(long["study_id"], columns, strict=True)]
    if dropna:
        long = long[codes.ravel() != MISSING_LABEL].reset_index(drop=True)
    return long[list(LONG_COLUMNS)]


def long_to_wide(long: pd.DataFrame, study_ids: Sequence[int] | None = None) -> pd.DataFrame:
    """Inverse of :func:`wide_to_long`; keys from ``column`` or from (condition, level).

    Rows follow ``study_ids`` when given (studies absent from ``long`` come back all-empty),
    else the order in which studies first appear.
    """
    _require_columns(long, ("study_id", "severity"), "long label table")
    if "column" in long.columns:
        columns = long["column"]
    else:
        _require_columns(long, ("condition", "level"), "long label table")
        columns = long["condition"].astype(str) + "_" + long["level"].astype(str)
    unknown = sorted(set(columns) - set(LABEL_COLUMNS))
    if unknown:
        raise ValueError(f"long label table: unknown condition/level columns {unknown[:5]}")
    keyed = pd.DataFrame(
        {
            "study_id": long["study_id"].to_numpy(),
            "column": columns.to_numpy(),
            "v": long["severity"],
        }
    )
    dup = keyed.duplicated(["study_id", "column"])
    if dup.any():
        first = keyed[dup].iloc[0]
        raise ValueError(
            f"long label table: {int(dup.sum())} repeated (study, column) pairs, "
            f"e.g. study {first['study_id']} {first['column']}; keep one grade per cell"
        )
    order = pd.unique(keyed["study_id"]) if study_ids is None else list(study_ids)
    wide = keyed.pivot(index="study_id", columns="column", values="v")
    wide = wide.reindex(index=order, columns=list(LABEL_COLUMNS)).rename_axis(
        index="study_id", columns=None
    )
    wide = wide.reset_index().astype({"study_id": "int64"})
    label_matrix(wide)  # validates the severities
    return wide


def solution_table(wide: pd.DataFrame, include_weight: bool = False) -> pd.DataFrame:
    """The metric's solution: one row per labelled cell, row_id + one-hot, sorted by row_id.

    ``include_weight`` adds the competition's ``sample_weight`` (1/2/4 by the true class).
    """
    long = wide_to_long(wide, dropna=True)
    codes = long["severity"].map(SEVERITY_INDEX).to_numpy(dtype=np.int64)
    solution = pd.DataFrame({"row_id": long["row_id"].to_numpy()})
    for k, name in enumerate(PROB_COLUMNS):
        solution[name] = (codes == k).astype(np.float64)
    if include_weight:
        solution["sample_weight"] = np.asarray(CLASS_WEIGHTS)[codes]
    return solution.sort_values("row_id", kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# Coordinates <-> labels
# ---------------------------------------------------------------------------------------------
def normalize_coordinates(coords: pd.DataFrame) -> pd.DataFrame:
    """Coordinates in package vocabulary: snake_case condition/level, + side, column, row_id."""
    _require_columns(coords, COORDINATE_COLUMNS, "coordinate table")
    out = coords.copy()
    unknown = sorted(set(out["condition"]) - set(TITLE_TO_CONDITION)) + sorted(
        set(out["level"]) - set(TITLE_TO_LEVEL)
    )
    if unknown:
        raise ValueError(f"coordinate table: unknown condition/level titles {unknown[:5]}")
    out["condition"] = out["condition"].map(TITLE_TO_CONDITION)
    out["level"] = out["level"].map(TITLE_TO_LEVEL)
    out["side"] = out["condition"].map(CONDITION_SIDE)
    out["column"] = out["condition"] + "_" + out["level"]
    out["row_id"] = [row_id(s, c) for s, c in zip(out["study_id"], out["column"], strict=True)]
    return out


def coordinates_to_titles(coords: pd.DataFrame) -> pd.DataFrame:
    """Inverse of :func:`normalize_coordinates`: the file's columns and Title Case vocabulary."""
    _require_columns(coords, COORDINATE_COLUMNS, "coordinate table")
    out = coords[list(COORDINATE_COLUMNS)].copy()
    out["condition"] = out["condition"].map(CONDITION_TITLES)
    out["level"] = out["level"].map(LEVEL_TITLES)
    if out[["condition", "level"]].isna().any().any():
        raise ValueError("coordinate table: conditions/levels must be snake_case package names")
    return out


def join_labels_coordinates(
    wide: pd.DataFrame,
    coords: pd.DataFrame,
    series: pd.DataFrame | None = None,
    how: str = "inner",
) -> pd.DataFrame:
    """Labelled cells joined with their points on (study_id, condition, level).

    ``coords`` is the table as loaded (Title Case). ``how``: "inner" (graded cells with a point),
    "left" (every graded cell, x/y NaN without a point), "right" (every point, severity NaN
    without a grade) or "outer". A cell labelled on two series gives two rows. ``series`` adds
    ``series_description``.
    """
    labels = wide_to_long(wide, dropna=True)
    points = normalize_coordinates(coords)
    points = points[["study_id", "column", "series_id", "instance_number", "x", "y"]]
    joined = labels[["study_id", "column", "severity"]].merge(
        points, on=["study_id", "column"], how=how, validate="one_to_many"
    )
    for name, values in _derived_keys(joined["column"]).items():
        joined[name] = values  # also fills the keys of points that have no grade
    joined["row_id"] = [
        row_id(s, c) for s, c in zip(joined["study_id"], joined["column"], strict=True)
    ]
    if series is not None:
        desc = series[["study_id", "series_id", "series_description"]]
        joined = joined.merge(desc, on=["study_id", "series_id"], how="left")
    extra = [c for c in ("series_description",) if c in joined.columns]
    cols = [*LONG_COLUMNS, "series_id", "instance_number", "x", "y", *extra]
    return joined[cols]
