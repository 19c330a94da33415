"""One vocabulary for the whole package: conditions, levels, severities, columns, row ids, weights,
series names and the axes of patient space.

Everything that names a target or orders the 25 columns goes through this module, so the CSVs,
the metric, the model heads and the reports can never disagree about what column 7 means.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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
# Classes of a training folder's label maps (value -> class; spinegrade.data.label_maps): what the
# localiser's segmentation head draws. The sacrum is not drawn as a vertebra (SPIDER's masks).
LABEL_CLASSES: tuple[str, ...] = ("background", "disc", "vertebra", "spinal canal")
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


# ---------------------------------------------------------------------------------------------
# Task definitions: what a run grades (RSNA 2024's 25 targets by default)
# ---------------------------------------------------------------------------------------------
# The points a crop can be centred on, by short name: the five RSNA click points of a level (a
# row of StudyPoints.xyz each, condition order) and the centre of the disc itself.
ANCHORS: tuple[str, ...] = (
    "canal", "left_foramen", "right_foramen", "left_recess", "right_recess", "disc_centre"
)  # fmt: skip
VIEWS: tuple[str, ...] = ("sagittal", "axial")
TASK_FILE = "task.yaml"  # a dataset's (and a run's) own task definition
TASK_METRICS: tuple[str, ...] = ("rsna2024", "grades")


class TaskError(ValueError):
    """A task definition that cannot be used (unknown key, bad grade list, ...)."""


# The private coding scheme of spinegrade's own SR codes (spinegrade.reporting.codes). It lives
# here so a task's own codes can be refused in it: they are another terminology's, never ours
# under another meaning.
PRIVATE_SCHEME = "99SPINEGRADE"


def _check_code(code: tuple[str, str, str], where: str) -> None:
    """A (value, scheme designator, meaning) triple an SR can carry: Code Value and Coding Scheme
    Designator are VR SH (16 characters), Code Meaning LO (64)."""
    if len(code) != 3 or not all(isinstance(v, str) and v.strip() for v in code):
        raise TaskError(f"{where}: give value, scheme and meaning, e.g. "
                        "{value: '77547008', scheme: SCT, meaning: ...}")  # fmt: skip
    value, scheme, meaning = code
    if len(value) > 16 or len(scheme) > 16 or len(meaning) > 64:
        raise TaskError(f"{where}: value and scheme hold 16 characters, meaning 64 ({code})")
    if scheme == PRIVATE_SCHEME:
        raise TaskError(f"{where}: {PRIVATE_SCHEME} is spinegrade's own scheme; name another")


@dataclass(frozen=True)
class Condition:
    """One graded finding, read at every level of its task.

    ``grades`` are the names written in train.csv's cells, in class order (severity or grade
    order when ``ordinal``); ``columns`` name the probability columns of oof.csv and the
    submission (one a grade). ``class_weights`` weight the loss and, for the RSNA metric, the
    score. ``group`` is the grader network that reads it: conditions of one group share one
    model; a condition and its ``mirror`` (the other side) share one output, their right-side
    crops mirrored onto the left. ``series``/``view`` say what a radiologist reads it on, and
    ``anchor`` which located point its crop is centred on.
    """

    name: str
    title: str
    grades: tuple[str, ...]
    columns: tuple[str, ...]
    class_weights: tuple[float, ...]
    ordinal: bool
    group: str
    series: str
    view: str
    anchor: str
    side: str | None = None
    mirror: str = ""  # "" = itself (no side)
    # Coded concepts for the DICOM SR, (value, scheme designator, meaning): the finding's and one
    # per grade (e.g. SNOMED CT's, as a hospital's registry counts them). Unset, the SR names them
    # by private codes derived from the names (spinegrade.reporting.codes).
    code: tuple[str, str, str] | None = None
    grade_codes: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        where = f"condition {self.name!r}"
        if self.code is not None:
            _check_code(self.code, f"{where}: code")
        if self.grade_codes:
            if len(self.grade_codes) != len(self.grades):
                raise TaskError(
                    f"{where}: grade_codes needs one code per grade ({len(self.grades)})"
                )
            for g, code in zip(self.grades, self.grade_codes, strict=True):
                _check_code(code, f"{where}: the code of grade {g!r}")
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise TaskError(f"{where}: names are lower-case identifiers (e.g. disc_narrowing)")
        if len(self.grades) < 2 or len(set(self.grades)) != len(self.grades):
            raise TaskError(f"{where}: needs two or more distinct grades, got {self.grades}")
        if len(self.columns) != len(self.grades) or len(set(self.columns)) != len(self.columns):
            raise TaskError(f"{where}: one distinct probability column per grade")
        if len(self.class_weights) != len(self.grades) or min(self.class_weights) <= 0:
            raise TaskError(f"{where}: one positive class weight per grade")
        if self.series not in SERIES_DESCRIPTIONS:
            raise TaskError(f"{where}: series must be one of {list(SERIES_DESCRIPTIONS)}")
        if self.view not in VIEWS or self.anchor not in ANCHORS:
            raise TaskError(f"{where}: view in {list(VIEWS)}, anchor in {list(ANCHORS)}")
        if self.side not in (None, "left", "right"):
            raise TaskError(f"{where}: side is left, right or empty")
        if not self.mirror:
            object.__setattr__(self, "mirror", self.name)


@dataclass(frozen=True)
class Task:
    """What a run grades: its conditions, at ``levels``, scored by ``metric``.

    ``rsna2024`` is the competition's weighted log loss (three severity terms plus any-severe
    spinal; only the built-in RSNA task can use it); ``grades`` scores each condition on its own
    (quadratic-weighted kappa and within-one-grade accuracy where ordinal, ROC AUC where binary,
    balanced accuracy and log loss always: :mod:`spinegrade.evaluation.grades`). Columns are
    condition-major, ``{condition}_{level}``, as train.csv's.
    """

    name: str
    conditions: tuple[Condition, ...]
    levels: tuple[str, ...] = LEVELS
    metric: str = "grades"
    description: str = ""

    def __post_init__(self) -> None:
        names = [c.name for c in self.conditions]
        if not names or len(set(names)) != len(names):
            raise TaskError(f"task {self.name!r}: needs distinct conditions, got {names}")
        if tuple(self.levels) != LEVELS:
            # The localiser finds L1/L2..L5/S1; other levels (thoracic discs) need its targets.
            raise TaskError(f"task {self.name!r}: levels must be {list(LEVELS)} (the localiser's)")
        if self.metric not in TASK_METRICS:
            raise TaskError(f"task {self.name!r}: metric must be one of {list(TASK_METRICS)}")
        by_name = dict(zip(names, self.conditions, strict=True))
        for c in self.conditions:
            other = by_name.get(c.mirror)
            if other is None or other.mirror != c.name or other.group != c.group:
                raise TaskError(
                    f"task {self.name!r}: condition {c.name!r} mirrors {c.mirror!r}, which must "
                    "be a condition of the same group mirroring it back"
                )
            if other.grades != c.grades:
                raise TaskError(f"task {self.name!r}: {c.name!r} and its mirror differ in grades")

    # -- lookups -----------------------------------------------------------------------------
    def condition(self, name: str) -> Condition:
        for c in self.conditions:
            if c.name == name:
                return c
        raise KeyError(f"task {self.name!r} has no condition {name!r}")

    @property
    def condition_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.conditions)

    @functools.cached_property
    def columns(self) -> tuple[str, ...]:
        """The label columns, condition-major: ``{condition}_{level}``."""
        return tuple(f"{c.name}_{lv}" for c in self.conditions for lv in self.levels)

    @functools.cached_property
    def _column_index(self) -> dict[str, int]:
        return {col: i for i, col in enumerate(self.columns)}

    def column_index(self, column: str) -> int:
        try:
            return self._column_index[column]
        except KeyError:
            raise KeyError(f"{column!r} is not a label column of task {self.name!r}") from None

    def column_condition(self, column: str) -> Condition:
        return self.conditions[self.column_index(column) // len(self.levels)]

    def column_level(self, column: str) -> str:
        return self.levels[self.column_index(column) % len(self.levels)]

    def condition_columns(self, name: str) -> list[str]:
        """The level columns of one condition, L1/L2 -> L5/S1."""
        return [f"{name}_{lv}" for lv in self.levels]

    @property
    def groups(self) -> tuple[str, ...]:
        """The grader networks, in order of their first condition."""
        return tuple(dict.fromkeys(c.group for c in self.conditions))

    def select_groups(self, requested: Sequence[str]) -> list[str]:
        """The grader groups to train for ``train.groups``: as listed for RSNA; for another
        task, its groups among those listed, or all of them when the list names none of them
        (the config's default lists RSNA's three), so ``train.groups=[]`` still trains none."""
        if self.is_rsna:
            return list(requested)
        mine = [g for g in self.groups if g in requested]
        return mine if mine or not requested else list(self.groups)

    def group_conditions(self, group: str) -> tuple[str, ...]:
        return tuple(c.name for c in self.conditions if c.group == group)

    def heads(self, group: str) -> tuple[str, ...]:
        """A group's outputs: one per condition, a mirrored pair sharing the first one's."""
        out: list[str] = []
        for name in self.group_conditions(group):
            if self.condition(name).mirror not in out:
                out.append(name)
        return tuple(out)

    def head_of(self, name: str) -> int:
        """The output of ``name`` within its group's network."""
        c = self.condition(name)
        heads = self.heads(c.group)
        return heads.index(name) if name in heads else heads.index(c.mirror)

    @property
    def n_classes(self) -> int:
        """Width of a probability row: the most grades any condition has (shorter ones padded)."""
        return max(len(c.grades) for c in self.conditions)

    def group_classes(self, group: str) -> int:
        return max(len(self.condition(n).grades) for n in self.group_conditions(group))

    @property
    def is_rsna(self) -> bool:
        return self.metric == "rsna2024"

    # -- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain dict (YAML-ready); :func:`task_from_dict` reads it back."""
        conditions = []
        for c in self.conditions:
            d = dataclasses.asdict(c)
            d["grades"], d["columns"] = list(c.grades), list(c.columns)
            d["class_weights"] = list(c.class_weights)
            # Codes only where given: task.yaml files without them read and write as before.
            d.pop("code"), d.pop("grade_codes")
            if c.code is not None:
                d["code"] = _code_dict(c.code)
            if c.grade_codes:
                d["grade_codes"] = [_code_dict(g) for g in c.grade_codes]
            conditions.append(d)
        return {
            "name": self.name,
            "description": self.description,
            "metric": self.metric,
            "levels": list(self.levels),
            "conditions": conditions,
        }


_CONDITION_KEYS = {f.name for f in dataclasses.fields(Condition)}


def task_from_dict(data: dict, where: str = "task") -> Task:
    """A :class:`Task` from its dict (``task.yaml``); errors name ``where`` and the key."""
    if not isinstance(data, dict):
        raise TaskError(f"{where}: a task is a mapping with name, conditions, ...")
    unknown = set(data) - {"name", "description", "metric", "levels", "conditions"}
    if unknown:
        raise TaskError(f"{where}: unknown keys {sorted(unknown)}")
    conditions = []
    for i, raw in enumerate(data.get("conditions") or []):
        if not isinstance(raw, dict):
            raise TaskError(f"{where}: conditions[{i}] is not a mapping")
        bad = set(raw) - _CONDITION_KEYS
        if bad:
            raise TaskError(f"{where}: conditions[{i}] has unknown keys {sorted(bad)}")
        lacking = [
            k for k in ("name", "grades", "group", "series", "view", "anchor") if k not in raw
        ]
        if lacking:
            raise TaskError(f"{where}: conditions[{i}] lacks {', '.join(lacking)}")
        try:
            grades = tuple(str(g) for g in raw["grades"])
            kw = dict(raw)
            kw["grades"] = grades
            kw["columns"] = tuple(str(c) for c in raw.get("columns") or grade_columns(grades))
            kw["class_weights"] = tuple(
                float(w) for w in raw.get("class_weights") or [1.0] * len(grades)
            )
            kw.setdefault("ordinal", False)
            if raw.get("code") is not None:
                kw["code"] = _code_tuple(raw["code"], f"{where}: conditions[{i}].code")
            kw["grade_codes"] = tuple(
                _code_tuple(g, f"{where}: conditions[{i}].grade_codes[{k}]")
                for k, g in enumerate(raw.get("grade_codes") or [])
            )
            kw.setdefault("title", raw["name"].replace("_", " ").capitalize())
            conditions.append(Condition(**kw))
        except KeyError as err:
            raise TaskError(f"{where}: conditions[{i}] lacks {err}") from None
        except TypeError as err:
            raise TaskError(f"{where}: conditions[{i}]: {err}") from None
    if "name" not in data:
        raise TaskError(f"{where}: lacks name")
    if data["name"] == RSNA_2024.name and data.get("metric", "rsna2024") == "rsna2024":
        task = Task(
            str(data["name"]), tuple(conditions), tuple(data.get("levels") or LEVELS),
            "rsna2024", str(data.get("description") or ""),
        )  # fmt: skip
        if task.to_dict() != RSNA_2024.to_dict():
            raise TaskError(f"{where}: a task named {RSNA_2024.name!r} must be the built-in one")
        return RSNA_2024
    if data.get("metric") == "rsna2024":
        raise TaskError(f"{where}: the rsna2024 metric belongs to the built-in RSNA task only")
    return Task(
        str(data["name"]), tuple(conditions), tuple(data.get("levels") or LEVELS),
        str(data.get("metric") or "grades"), str(data.get("description") or ""),
    )  # fmt: skip


def _code_dict(code: tuple[str, str, str]) -> dict[str, str]:
    return {"value": code[0], "scheme": code[1], "meaning": code[2]}


def _code_tuple(raw: object, where: str) -> tuple[str, str, str]:
    """``{value, scheme, meaning}`` of task.yaml -> the triple a Condition keeps."""
    if not isinstance(raw, dict) or set(raw) != {"value", "scheme", "meaning"}:
        raise TaskError(
            f"{where}: a code is {{value: ..., scheme: ..., meaning: ...}}, got {raw!r}"
        )
    return (str(raw["value"]), str(raw["scheme"]), str(raw["meaning"]))


def grade_columns(grades: tuple[str, ...]) -> tuple[str, ...]:
    """Probability column names from grade names: ``Normal/Mild`` -> ``normal_mild``, ``3`` ->
    ``grade_3``."""
    out = []
    for g in grades:
        name = "".join(ch if ch.isalnum() else "_" for ch in g.lower()).strip("_")
        out.append(f"grade_{name}" if not name or name[0].isdigit() else name)
    return tuple(out)


def load_task(path: str | Path) -> Task:
    """Read a ``task.yaml`` (errors name the file)."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise TaskError(f"{path}: cannot read the task definition ({err})") from None
    try:
        return task_from_dict(data, str(path))
    except TaskError as err:
        msg = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise TaskError(msg) from None


def save_task(task: Task, path: str | Path) -> None:
    """Write ``task.yaml`` atomically."""
    import yaml

    from spinegrade.util.atomic import write_text

    write_text(path, yaml.safe_dump(task.to_dict(), sort_keys=False))


def dataset_task(folder: str | Path) -> Task:
    """The task of a data folder or a run folder: its ``task.yaml``, else RSNA 2024 (folders
    without one, runs from before task definitions)."""
    path = Path(folder) / TASK_FILE
    return load_task(path) if path.is_file() else RSNA_2024


def _rsna_condition(name: str, anchor: str) -> Condition:
    return Condition(
        name=name, title=CONDITION_TITLES[name], grades=SEVERITIES, columns=PROB_COLUMNS,
        class_weights=CLASS_WEIGHTS, ordinal=True, group=CONDITION_GROUP[name],
        series=CONDITION_SERIES[name],
        view="axial" if CONDITION_SERIES[name] == AX_T2 else "sagittal",
        anchor=anchor, side=CONDITION_SIDE[name], mirror=MIRROR_CONDITION[name],
    )  # fmt: skip


# RSNA 2024: 5 conditions x 5 levels, Normal/Mild, Moderate, Severe, the competition's metric.
RSNA_2024 = Task(
    name="rsna2024",
    conditions=tuple(_rsna_condition(c, a) for c, a in zip(CONDITIONS, ANCHORS, strict=False)),
    metric="rsna2024",
    description="RSNA 2024 Lumbar Spine Degenerative Classification: 25 targets",
)

_ABSENT_PRESENT = ("absent", "present")


def _disc_condition(name: str, title: str, grades: tuple[str, ...], ordinal: bool) -> Condition:
    return Condition(
        name=name, title=title, grades=grades, columns=grade_columns(grades),
        class_weights=(1.0,) * len(grades), ordinal=ordinal, group="disc", series=SAG_T2,
        view="sagittal", anchor="disc_centre",
    )  # fmt: skip


# SPIDER's radiological gradings of each lumbar disc, read on the sagittal T2 around the disc.
SPIDER_DISCS = Task(
    name="spider_discs",
    conditions=(
        _disc_condition("pfirrmann", "Pfirrmann grade", ("1", "2", "3", "4", "5"), True),
        _disc_condition("disc_narrowing", "Disc narrowing", _ABSENT_PRESENT, False),
        _disc_condition("disc_bulging", "Disc bulging", _ABSENT_PRESENT, False),
        _disc_condition("disc_herniation", "Disc herniation", _ABSENT_PRESENT, False),
        _disc_condition("spondylolisthesis", "Spondylolisthesis", _ABSENT_PRESENT, False),
    ),
    metric="grades",
    description="Disc degeneration as SPIDER's readers graded it (Pfirrmann 1-5, four findings)",
)
BUILTIN_TASKS: dict[str, Task] = {t.name: t for t in (RSNA_2024, SPIDER_DISCS)}
