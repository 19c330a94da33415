"""One phantom study: its anatomy, series plan, instance numbers, DICOM files and label points.

:func:`generate_study` is what a worker of :func:`.generate.generate_dataset` runs.
Each study draws everything from its own random stream (seed, split, index), so its bytes do not
depend on which process generates it or in what order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from spinegrade.phantom.anatomy import (
    N_LEVELS,
    Anatomy,
    canal_centre_local,
    label_point,
    sample_anatomy,
)
from spinegrade.phantom.labels import LabelModel, anatomical_severity
from spinegrade.phantom.ops import build_ops
from spinegrade.phantom.render import (
    SagittalGeometry,
    Scanner,
    SeriesPlan,
    SlicePlan,
    _orthonormal,
    _stack,
    _tilt,
    plan_axial,
    render_slice,
)
from spinegrade.phantom.writer import SeriesMeta, SeriesWriter, StudyMeta, fmt_float, uid
from spinegrade.task import (
    AX_T2,
    CONDITION_SERIES,
    CONDITION_TITLES,
    CONDITIONS,
    LEVEL_TITLES,
    LEVELS,
    SAG_T1,
    SAG_T2,
    SERIES_DESCRIPTIONS,
)

SPLITS = {"train": 0, "test": 1}
EMPTY = -1  # an empty label cell


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the phantom. The defaults are the benchmarked settings."""

    sagittal_slices: tuple[int, int] = (15, 17)  # inclusive range per sagittal series
    axial_per_level: tuple[int, int] = (3, 5)  # slices in each angled axial stack
    stir_fraction: float = 0.2  # share of "Sagittal T2/STIR" series acquired as STIR
    shared_sagittal: float = 0.6  # share of studies whose T1 and T2 share slice positions
    label_jitter_mm: float = 0.8  # annotators' click scatter around the true structure
    quirks: bool = False  # real-data oddities: extra/missing series, empty cells, offsets
    quirk_scale: float = 1.0  # multiplies every quirk's frequency (tests use a large value)
    labels: LabelModel = field(default_factory=LabelModel)
    # Sizes (the defaults draw exactly what the demo's phantom always drew; see PROFILES["rsna"]).
    sagittal_matrices: tuple[int, ...] = (384, 448, 512)  # display matrix choices, sagittal
    # (0, 0): one short angled axial stack per level; (lo, hi): lo..hi parallel blocks that
    # together cover the levels, as many real axial T2 series are acquired.
    axial_blocks: tuple[int, int] = (0, 0)
    axial_long_fraction: float = 0.0  # share of studies whose axial blocks are thin (>100 slices)
    duplicate_fraction: float = 0.0  # share of studies with a repeated (re-acquired) series

    def __post_init__(self) -> None:
        lo, hi = self.sagittal_slices
        if not 5 <= lo <= hi <= 40:
            raise ValueError(
                f"sagittal_slices must satisfy 5 <= lo <= hi <= 40: {self.sagittal_slices}"
            )
        lo, hi = self.axial_per_level
        if not 1 <= lo <= hi <= 15:
            raise ValueError(
                f"axial_per_level must satisfy 1 <= lo <= hi <= 15: {self.axial_per_level}"
            )
        lo, hi = self.axial_blocks
        if (lo, hi) != (0, 0) and not 1 <= lo <= hi <= N_LEVELS:
            raise ValueError(
                f"axial_blocks must be (0, 0) or 1 <= lo <= hi <= {N_LEVELS}: {self.axial_blocks}"
            )
        if not self.sagittal_matrices or min(self.sagittal_matrices) < 32:
            raise ValueError(f"sagittal_matrices must be sizes >= 32: {self.sagittal_matrices}")

    def to_dict(self) -> dict:
        """The config as recorded in ``truth/phantom.json``; size options at their defaults are
        left out, so the default phantom's record stays byte for byte what it always was."""
        out = asdict(self)
        for name in _SIZE_OPTIONS:
            if getattr(self, name) == _SIZE_DEFAULTS[name]:
                del out[name]
        return out


_SIZE_OPTIONS = ("sagittal_matrices", "axial_blocks", "axial_long_fraction", "duplicate_fraction")
_SIZE_DEFAULTS = {f.name: f.default for f in fields(SynthConfig) if f.name in _SIZE_OPTIONS}


# Named size profiles for `spinegrade synth --profile`. "default" is the demo's phantom (its bytes
# must not change); "rsna" has the real training set's series sizes (rsna-format.md): sagittal
# 15-20 slices at 384-640 px, axial T2 as 1-3 stacks of 20-60 slices in all (a few thin-sliced
# ones past 100) and occasional repeated series.
PROFILES: dict[str, SynthConfig] = {
    "default": SynthConfig(),
    "rsna": SynthConfig(
        sagittal_slices=(15, 20),
        sagittal_matrices=(384, 448, 512, 640),
        axial_blocks=(1, 3),
        axial_long_fraction=0.05,
        duplicate_fraction=0.1,
    ),
}


def synth_profile(name: str) -> SynthConfig:
    """The :class:`SynthConfig` of a named profile (see :data:`PROFILES`)."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown phantom profile {name!r}: choose one of {sorted(PROFILES)}"
        ) from None


@dataclass
class StudyTask:
    """Everything a worker needs to write one study (picklable)."""

    root: Path
    split: str
    index: int
    seed: int
    study_id: int
    latents: np.ndarray  # (25,)
    grades: np.ndarray  # (25,) 0/1/2
    config: SynthConfig


@dataclass
class StudyRecord:
    """What a worker hands back for the CSVs."""

    study_id: int
    series: list[tuple[int, str]]  # (series_id, description)
    coordinates: list[tuple[int, int, int, str, str, str, str]]
    grades: np.ndarray  # (25,) with EMPTY where the label cell is empty
    n_files: int


@dataclass
class _Quirks:
    """Per-study oddities (all off for clean studies)."""

    axial_split: bool = False  # levels spread over two Axial T2 series
    axial_skip_top: int = 0  # stacks missing at the top (L1/L2, L2/L3): empty subarticular cells
    missing: str | None = None  # a series description that was not acquired
    empty_condition: int | None = None  # a condition left unlabelled at every level
    offsets: dict[str, int] = field(default_factory=dict)  # InstanceNumber offsets
    compress: bool = False  # RLE-compressed pixel data (first series)
    rescale: tuple[float, float] = (1.0, 0.0)  # RescaleSlope/Intercept of the second series


def _draw_quirks(rng: np.random.Generator, scale: float = 1.0) -> _Quirks:
    """Frequencies roughly as in the real data (rsna-format.md, rsna-stats.md), times ``scale``."""

    def chance(p: float) -> bool:
        return bool(rng.random() < min(1.0, p * scale))

    q = _Quirks()
    q.axial_split = chance(0.09)
    if chance(0.09):
        q.axial_skip_top = 1 if rng.random() < 0.7 else 2
    if chance(0.02):
        q.missing = str(rng.choice(list(SERIES_DESCRIPTIONS)))
    if chance(0.01):
        q.empty_condition = int(rng.integers(0, len(CONDITIONS)))
    for desc in SERIES_DESCRIPTIONS:
        if chance(0.12):
            q.offsets[desc] = int(rng.choice([rng.integers(1, 40), 100 * rng.integers(1, 50)]))
    q.compress = chance(0.1)
    if chance(0.08):  # stored values that only make sense after RescaleSlope/Intercept
        q.rescale = (float(rng.choice([0.5, 2.0, 4.0])), float(rng.choice([0.0, -100.0])))
    return q


# ---------------------------------------------------------------------------- one study


def start_study(task: StudyTask) -> tuple[np.random.Generator, Anatomy]:
    """The study's random stream and its anatomy (the first thing drawn from it)."""
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, SPLITS[task.split], task.index]))
    severity = anatomical_severity(task.latents).reshape(len(CONDITIONS), N_LEVELS)
    return rng, sample_anatomy(rng, severity)


def generate_study(task: StudyTask) -> StudyRecord:
    """Sample, render and write one study; return its CSV rows."""
    # The work is many small array operations: BLAS threads only fight the worker processes.
    with threadpool_limits(1):
        return _generate_study(task)


def _generate_study(task: StudyTask) -> StudyRecord:
    cfg = task.config
    rng, anat = start_study(task)
    ops = build_ops(anat)
    scanner = Scanner.random(rng)
    quirks = _draw_quirks(rng, cfg.quirk_scale) if cfg.quirks else _Quirks()
    study = _study_meta(rng, task)
    series = _plan_series(rng, anat, cfg, quirks, task)
    grades = _empty_cells(task.grades.copy(), quirks, series)
    folder = task.root / f"{task.split}_images" / str(task.study_id)
    n_files = _render_and_write(rng, anat, ops, scanner, series, study, folder)
    coords = _coordinates(rng, anat, series, grades, task.study_id, cfg.label_jitter_mm)
    return StudyRecord(
        study_id=task.study_id,
        series=[(s.series_id, s.plan.description) for s in series],
        coordinates=coords,
        grades=grades,
        n_files=n_files,
    )


@dataclass
class _Series:
    series_id: int
    plan: SeriesPlan
    meta: SeriesMeta
    group: int  # series in the same group share slice positions and are rendered together


def _study_meta(rng: np.random.Generator, task: StudyTask) -> StudyMeta:
    # A fake patient: the ID is a random string, never the study id.
    pid = f"PH{rng.integers(10**7, 10**8)}"
    return StudyMeta(
        study_uid=uid(task.seed, task.split, task.study_id),
        frame_uid=uid(task.seed, task.split, task.study_id, "frame"),
        patient_id=pid,
        patient_name=f"PHANTOM^{pid[2:]}",
        birth_date=f"{rng.integers(1940, 2000)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        sex=str(rng.choice(["F", "M"])),
        study_date=f"20{rng.integers(15, 24)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        accession=f"A{rng.integers(10**6, 10**7)}",
        field_strength=float(rng.choice([1.5, 3.0])),
    )


def _plan_series(rng, anat, cfg: SynthConfig, quirks: _Quirks, task: StudyTask) -> list[_Series]:
    """Sagittal T1, Sagittal T2/STIR and one or two Axial T2 series, with instance numbers."""
    n_sag = int(rng.integers(cfg.sagittal_slices[0], cfg.sagittal_slices[1] + 1))
    geo_t1 = SagittalGeometry.plan(rng, anat, n_sag)
    matrix_t1 = int(rng.choice(list(cfg.sagittal_matrices)))
    shared = rng.random() < cfg.shared_sagittal
    geo_t2 = geo_t1 if shared else SagittalGeometry.plan(rng, anat, n_sag)
    matrix_t2 = matrix_t1 if shared else int(rng.choice(list(cfg.sagittal_matrices)))
    t2_contrast = "STIR" if rng.random() < cfg.stir_fraction else "T2"
    per_level = int(rng.integers(cfg.axial_per_level[0], cfg.axial_per_level[1] + 1))
    levels = list(range(quirks.axial_skip_top, N_LEVELS))
    if cfg.axial_blocks == (0, 0):
        axial = plan_axial(rng, anat, levels, per_level)
    else:
        axial = _plan_axial_blocks(rng, anat, levels, cfg)
    plans = [
        (SeriesPlan(SAG_T1, "T1", geo_t1.slices(matrix_t1)), 0),
        (SeriesPlan(SAG_T2, t2_contrast, geo_t2.slices(matrix_t2)), 0 if shared else 1),
    ]
    if quirks.axial_split:
        cut = levels[len(levels) // 2]
        parts = [[s for s in axial if s.level < cut], [s for s in axial if s.level >= cut]]
    else:
        parts = [axial]
    plans += [(SeriesPlan(AX_T2, "T2", part), 2 + k) for k, part in enumerate(parts)]
    plans = [p for p in plans if p[0].description != quirks.missing]
    if cfg.duplicate_fraction > 0 and plans and rng.random() < cfg.duplicate_fraction:
        # A re-acquired series (e.g. after patient motion): same plan, its own noise and id.
        plan, _ = plans[int(rng.integers(len(plans)))]
        plans.append((SeriesPlan(plan.description, plan.contrast, list(plan.slices)), 9))
    ids = _distinct_ids(rng, len(plans))
    out = []
    for number, ((plan, group), sid) in enumerate(zip(plans, ids, strict=True), start=1):
        plan.instance_numbers = _instance_numbers(
            rng, plan, quirks.offsets.get(plan.description, 0)
        )
        meta = SeriesMeta(
            series_uid=uid(task.seed, task.split, task.study_id, int(sid)),
            series_number=number,
            description=plan.description,
            contrast=plan.contrast,
            write_thickness=not (cfg.quirks and task.split == "test"),
            compress=quirks.compress and number == 1,
            rescale=quirks.rescale if number == 2 else (1.0, 0.0),
        )
        out.append(_Series(int(sid), plan, meta, group))
    return out


def _plan_axial_blocks(
    rng: np.random.Generator, anat: Anatomy, levels: list[int], cfg: SynthConfig
) -> list[SlicePlan]:
    """Axial T2 as 1-3 blocks of parallel slices, each covering neighbouring levels (or, in
    ``axial_long_fraction`` of studies, one thin-sliced block of 100+ slices).

    Each block is tilted to the mean of its discs' normals and runs from 7-15 mm below its lowest
    to as far above its highest disc; every slice is tagged with its nearest level (what a reader
    would grade on it). Slices run inferior -> superior within a block, as in :func:`plan_axial`.
    """
    rot = anat.rotation
    matrix = int(rng.choice([320, 384, 448]))
    fov = rng.uniform(180.0, 230.0)
    thin = rng.random() < cfg.axial_long_fraction
    spacing = rng.uniform(1.0, 1.3) if thin else rng.uniform(3.0, 5.5)
    margin = rng.uniform(7.0, 15.0)  # coverage beyond the outer discs of a block
    thickness = spacing * rng.uniform(0.8, 1.0)
    shift = rng.normal(0, 6, 2)
    n_blocks = min(len(levels), int(rng.integers(cfg.axial_blocks[0], cfg.axial_blocks[1] + 1)))
    n_blocks = 1 if thin else n_blocks  # a thin-sliced axial is one contiguous volume
    slices: list[SlicePlan] = []
    for group in np.array_split(np.asarray(levels), n_blocks):
        discs = [anat.label_disc(int(li)) for li in group]
        centres = np.array(
            [anat.to_patient(d.frame.to_body(canal_centre_local(anat, d))) for d in discs]
        )
        mean_normal = np.mean([rot @ d.frame.axes[2] for d in discs], axis=0)
        normal = _tilt(rng, mean_normal / np.linalg.norm(mean_normal), 2.0)
        row, col = _orthonormal(normal, rot[:, 0])
        centre = centres.mean(axis=0)
        heights = (centres - centre) @ normal
        offsets = np.arange(heights.min() - margin, heights.max() + margin + 1e-6, spacing)
        block = _stack(
            centre + row * shift[0] + col * (shift[1] - 15.0), normal, row, col, offsets,
            matrix, fov, thickness,
        )  # fmt: skip
        nearest = [int(group[np.argmin(np.abs(heights - o))]) for o in offsets]
        slices += [replace(sl, level=lv) for sl, lv in zip(block, nearest, strict=True)]
    return slices


def _distinct_ids(rng: np.random.Generator, n: int) -> list[int]:
    """``n`` distinct series ids of 6-10 digits."""
    ids: list[int] = []
    while len(ids) < n:
        v = int(rng.integers(10**6, 4_290_000_000))
        if v not in ids:
            ids.append(v)
    return ids


def _instance_numbers(rng: np.random.Generator, plan: SeriesPlan, offset: int) -> list[int]:
    """InstanceNumber of every slice (plan order) as a scanner numbers them.

    Sagittal: 1..N from one side to the other; which side comes first varies (64/36 in the real
    data). Axial: stack by stack from L1/L2 down (88%) or from L5/S1 up (12%), each stack from
    superior to inferior; the plan holds each stack inferior -> superior.
    """
    n = len(plan.slices)
    if plan.description.startswith("Sagittal"):
        order = np.arange(n) if rng.random() < 0.64 else np.arange(n)[::-1]
    else:
        levels = [s.level for s in plan.slices]
        keys = [(lv, -k) for k, lv in enumerate(levels)]  # level ascending, superior first
        order = np.empty(n, dtype=int)
        order[sorted(range(n), key=lambda k: keys[k])] = np.arange(n)
        if rng.random() < 0.12:
            order = n - 1 - order
    return [int(o) + 1 + offset for o in order]


def _empty_cells(grades: np.ndarray, quirks: _Quirks, series: list[_Series]) -> np.ndarray:
    """Blank the cells a reader could not grade: levels no axial stack reached, lost conditions."""
    grades = grades.astype(int)
    covered = {s.level for ser in series if ser.plan.description == AX_T2 for s in ser.plan.slices}
    for ci, cond in enumerate(CONDITIONS):
        for li in range(N_LEVELS):
            j = ci * N_LEVELS + li
            if "subarticular" in cond and covered and li not in covered:
                grades[j] = EMPTY
            if quirks.empty_condition == ci:
                grades[j] = EMPTY
    return grades


def _render_and_write(rng, anat, ops, scanner, series, study, folder: Path) -> int:
    """Render every slice (series sharing positions in one pass) and write the DICOM files."""
    n_files = 0
    writers = {s.series_id: SeriesWriter(study, s.meta) for s in series}
    for group in sorted({s.group for s in series}):
        members = [s for s in series if s.group == group]
        contrasts = tuple(s.plan.contrast for s in members)
        for k, plan in enumerate(members[0].plan.slices):
            images = render_slice(rng, anat, ops, scanner, plan, contrasts)
            for ser, pixels in zip(members, images, strict=True):
                inst = ser.plan.instance_numbers[k]
                sop = uid(study.study_uid, ser.series_id, inst)
                path = folder / str(ser.series_id) / f"{inst}.dcm"
                writers[ser.series_id].write(path, pixels, ser.plan.slices[k], inst, sop)
                n_files += 1
    return n_files


def _coordinates(rng, anat, series: list[_Series], grades, study_id: int, jitter_mm: float):
    """One row per labelled cell whose series exists: the point on its structure, in pixels."""
    rows = []
    for ci, cond in enumerate(CONDITIONS):
        candidates = [s for s in series if s.plan.description == CONDITION_SERIES[cond]]
        for li in range(N_LEVELS):
            if grades[ci * N_LEVELS + li] == EMPTY or not candidates:
                continue
            point = anat.to_patient(label_point(anat, ci, li))
            best = min(((s, *s.plan.nearest_slice(point)) for s in candidates), key=lambda t: t[4])
            ser, k, x, y, _ = best
            sl = ser.plan.slices[k]
            x = float(np.clip(x + rng.normal(0, jitter_mm / sl.spacing[1]), 0, sl.shape[1] - 1))
            y = float(np.clip(y + rng.normal(0, jitter_mm / sl.spacing[0]), 0, sl.shape[0] - 1))
            rows.append(
                (
                    study_id,
                    ser.series_id,
                    ser.plan.instance_numbers[k],
                    CONDITION_TITLES[cond],
                    LEVEL_TITLES[LEVELS[li]],
                    fmt_float(x),
                    fmt_float(y),
                )
            )
    return rows
