"""One vocabulary for the whole package: conditions, levels, severities, columns, row ids, weights,
series names and the axes of patient space.

Everything that names a target or orders the 25 columns goes through this module, so the CSVs,
the metric, the model heads and the reports can never disagree about what column 7 means.
"""

from __future__ import annotations

import numpy as np

# Conditions in the order of the columns of train.csv.
CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
# Title Case names used in train_label_coordinates.csv.
CONDITION_TITLES: dict[str, str] = {
    "spinal_canal_stenosis": "Spinal Canal Stenosis",
    "left_neural_foraminal_narrowing": "Left Neural Foraminal Narrowing",
    "right_neural_foraminal_narrowing": "Right Neural Foraminal Narrowing",
    "left_subarticular_stenosis": "Left Subarticular Stenosis",
    "right_subarticular_stenosis": "Right Subarticular Stenosis",
}
TITLE_TO_CONDITION: dict[str, str] = {v: k for k, v in CONDITION_TITLES.items()}

# Metric groups: left and right are pooled into one term each for foramina and recesses.
CONDITION_GROUP: dict[str, str] = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal",
    "right_neural_foraminal_narrowing": "foraminal",
    "left_subarticular_stenosis": "subarticular",
    "right_subarticular_stenosis": "subarticular",
}
GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
CONDITION_SIDE: dict[str, str | None] = {
    "spinal_canal_stenosis": None,
    "left_neural_foraminal_narrowing": "left",
    "right_neural_foraminal_narrowing": "right",
    "left_subarticular_stenosis": "left",
    "right_subarticular_stenosis": "right",
}
# Swapping left and right is what a left/right flip of the image does to the labels.
MIRROR_CONDITION: dict[str, str] = {
    "spinal_canal_stenosis": "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing": "right_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing": "left_neural_foraminal_narrowing",
    "left_subarticular_stenosis": "right_subarticular_stenosis",
    "right_subarticular_stenosis": "left_subarticular_stenosis",
}

LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
LEVEL_TITLES: dict[str, str] = {lv: lv.upper().replace("_", "/") for lv in LEVELS}  # "L1/L2"
TITLE_TO_LEVEL: dict[str, str] = {v: k for k, v in LEVEL_TITLES.items()}

SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
SEVERITY_INDEX: dict[str, int] = {s: i for i, s in enumerate(SEVERITIES)}
# Submission probability columns, in class order.
PROB_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
# Sample weight of a row by its true class (the competition's 1/2/4).
CLASS_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

# The 25 label columns of train.csv, condition-major, in the competition's order.
LABEL_COLUMNS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)
COLUMN_CONDITION: dict[str, str] = {f"{c}_{lv}": c for c in CONDITIONS for lv in LEVELS}
COLUMN_LEVEL: dict[str, str] = {f"{c}_{lv}": lv for c in CONDITIONS for lv in LEVELS}

# A dataset made by `spinegrade synth` says so in truth/phantom.json ("generator"): the data layer
# reads it so that models trained on phantoms alone can say so on real studies.
PHANTOM_GENERATOR = "spinegrade.phantom"

# The three series of an RSNA study, as train_series_descriptions.csv names them.
SAG_T1, SAG_T2, AX_T2 = "Sagittal T1", "Sagittal T2/STIR", "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAG_T1, SAG_T2, AX_T2)
# Which series a radiologist reads each condition on (and where the coordinates are labelled).
CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": SAG_T2,
    "left_neural_foraminal_narrowing": SAG_T1,
    "right_neural_foraminal_narrowing": SAG_T1,
    "left_subarticular_stenosis": AX_T2,
    "right_subarticular_stenosis": AX_T2,
}

# Patient space is DICOM LPS millimetres: axis 0 runs to the patient's Left, 1 Posterior, 2 Head.
LPS_LEFT, LPS_POSTERIOR, LPS_HEAD = (np.eye(3)[i] for i in range(3))  # unit vectors
for _v in (LPS_LEFT, LPS_POSTERIOR, LPS_HEAD):
    _v.setflags(write=False)  # shared by every module: never changed in place
del _v
# Letters at the (negative, positive) end of each LPS axis, as DICOM writes them (H/F for
# head/foot, e.g. a slice direction "F->H") ...
AXIS_LETTERS: tuple[tuple[str, str], ...] = (("R", "L"), ("A", "P"), ("F", "H"))
# ... and as radiologists mark the edges of a displayed image (S/I for superior/inferior).
DISPLAY_AXIS_LETTERS: tuple[tuple[str, str], ...] = (("R", "L"), ("A", "P"), ("I", "S"))
# A slice's plane is named after the LPS axis its normal points along most.
PLANE_OF_AXIS: tuple[str, ...] = ("sagittal", "coronal", "axial")


def row_id(study_id: int | str, column: str) -> str:
    """Submission row id, e.g. ``44036939_spinal_canal_stenosis_l3_l4``."""
    return f"{study_id}_{column}"


def split_row_id(rid: str) -> tuple[int, str]:
    """Inverse of :func:`row_id`: ``(study_id, column)``."""
    study, _, column = rid.partition("_")
    if column not in COLUMN_CONDITION:
        raise ValueError(f"row_id {rid!r} does not end in one of the 25 label columns")
    return int(study), column


def submission_row_ids(study_ids: list[int] | tuple[int, ...]) -> list[str]:
    """Row ids in the order of the competition's sample submission (sorted by row_id string)."""
    return sorted(row_id(s, c) for s in study_ids for c in LABEL_COLUMNS)
