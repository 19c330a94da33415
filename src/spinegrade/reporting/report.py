"""Per-study reports a radiologist can read: one PNG figure, ``grades.json`` and an ``index.html``.

The figure shows what a reader would look at: the mid-sagittal T2 slice with the five located disc
levels marked and labelled with the spinal canal grade, the sagittal T1 slices through the left and
right foramina with the foraminal grades, the axial crop of every level with both subarticular
grades, a map of where the model looked (input-gradient saliency on the crop), and a 5 x 5 grade
grid. Images are shown in the standard display orientation (sagittal: anterior left, head up;
axial: patient right on the viewer's left) with orientation letters on the edges.

Nothing here sees a patient identifier: studies are named by their study id only, and no input path
is written into any output (hospital folder names often contain patient names).
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from spinegrade.task import (
    ANCHORS,
    CONDITIONS,
    DISPLAY_AXIS_LETTERS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    RSNA_2024,
    SAG_T1,
    SAG_T2,
    SEVERITIES,
    Condition,
    Task,
)

if TYPE_CHECKING:
    import torch

# Green / orange / red, readable on a dark image and for most colour-vision deficiencies as a
# light-to-dark ramp as well.
GRADE_COLORS: tuple[str, ...] = ("#4daf4a", "#ff9f1c", "#e41a1c")
SHORT_GRADE: tuple[str, ...] = ("Normal", "Moderate", "Severe")
SHORT_CONDITION: dict[str, str] = {
    "spinal_canal_stenosis": "Spinal canal",
    "left_neural_foraminal_narrowing": "L foramen",
    "right_neural_foraminal_narrowing": "R foramen",
    "left_subarticular_stenosis": "L subarticular",
    "right_subarticular_stenosis": "R subarticular",
}


@dataclass
class StudyPrediction:
    """Everything predicted for one study (the report's input).

    ``probs`` rows follow ``task.columns`` (RSNA: :data:`spinegrade.task.LABEL_COLUMNS`), one
    probability per grade of the row's condition (zero-padded to ``task.n_classes``); ``source``
    says per column whether the model saw it (``"model"``) or the training prior filled it in
    (``"prior"``). ``points`` is ``(5 RSNA conditions, 5 levels, 3)`` LPS mm and ``discs`` the
    ``(5 levels, 3)`` disc centres, NaN where not located. ``series`` names the series each
    description was read from (a study may hold duplicates).
    """

    study_id: int
    probs: np.ndarray
    source: list[str]
    points: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    series: dict[str, list[int]] = field(default_factory=dict)  # description -> series read
    task: Task = RSNA_2024
    discs: np.ndarray | None = None

    def column(self, name: str) -> np.ndarray:
        """The probabilities of one label column over its condition's grades."""
        c = self.task.column_condition(name)
        return self.probs[self.task.column_index(name)][: len(c.grades)]

    def point(self, condition: str, level: str) -> np.ndarray | None:
        """Where ``condition`` was read at ``level``: its anchor's located point, or None."""
        anchor = (
            ANCHORS[CONDITIONS.index(condition)]
            if condition in CONDITIONS
            else self.task.condition(condition).anchor
        )
        if anchor == ANCHORS[-1]:  # the disc centre
            p = None if self.discs is None else self.discs[LEVELS.index(level)]
        else:
            p = (
                None
                if self.points is None
                else self.points[ANCHORS.index(anchor), LEVELS.index(level)]
            )
        return None if p is None or np.isnan(p).any() else p


@dataclass
class ReportInputs:
    """Images for one study's figure: cached stacks by series type, crops and saliency by column."""

    stacks: Mapping[str, Sequence] = field(default_factory=dict)  # description -> [CachedStack]
    crops: Mapping[str, np.ndarray] = field(default_factory=dict)  # column -> (S, H, W)
    saliency: Mapping[str, np.ndarray] = field(default_factory=dict)  # column -> (H, W) >= 0
    # Or computed on demand for the one crop a panel shows: (column, crop) -> (H, W) map.
    saliency_fn: Callable[[str, np.ndarray], np.ndarray | None] | None = None

    def saliency_of(self, column: str) -> np.ndarray | None:
        if column in self.saliency:
            return self.saliency[column]
        if self.saliency_fn is not None and column in self.crops:
            return self.saliency_fn(column, self.crops[column])
        return None


# --------------------------------------------------------------------------------- helpers


def grade_of(p: np.ndarray) -> int:
    """The reported grade: the most probable class."""
    return int(np.argmax(p))


def orientation_letters(row_dir: np.ndarray, col_dir: np.ndarray) -> tuple[str, str, str, str]:
    """Patient direction letters at the (left, right, top, bottom) edges of a displayed image.

    Image columns increase along ``row_dir`` and rows along ``col_dir`` (DICOM convention), so the
    right edge points along ``row_dir`` and the bottom edge along ``col_dir``.
    """

    def letter(v: np.ndarray) -> str:
        axis = int(np.argmax(np.abs(v)))
        return DISPLAY_AXIS_LETTERS[axis][1 if v[axis] > 0 else 0]

    r, c = np.asarray(row_dir, float), np.asarray(col_dir, float)
    return letter(-r), letter(r), letter(-c), letter(c)


def display_window(img: np.ndarray) -> tuple[float, float]:
    """Grey-level window (1st..99.5th percentile), as a reader would set it for soft tissue."""
    lo, hi = np.percentile(img, [1.0, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def _mark_orientation(ax, letters: tuple[str, str, str, str]) -> None:
    left, right, top, bottom = letters
    style = dict(color="#ffd54f", fontsize=9, fontweight="bold", transform=ax.transAxes)
    ax.text(0.01, 0.5, left, ha="left", va="center", **style)
    ax.text(0.99, 0.5, right, ha="right", va="center", **style)
    ax.text(0.5, 0.99, top, ha="center", va="top", **style)
    ax.text(0.5, 0.01, bottom, ha="center", va="bottom", **style)


def _placeholder(ax, text: str) -> None:
    ax.set_facecolor("#202020")
    ax.text(0.5, 0.5, text, ha="center", va="center", color="#dddddd", fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _grade_label(p: np.ndarray, condition: Condition | None = None) -> str:
    """The most probable grade and its probability, e.g. ``Moderate 62%`` or ``4 80%``."""
    g = grade_of(p)
    name = (
        SHORT_GRADE[g]
        if condition is None or condition.grades == SEVERITIES
        else condition.grades[g]
    )
    return f"{name} {100 * p[g]:.0f}%"


def grade_color(condition: Condition, g: int) -> str:
    """The colour of grade ``g``: RSNA's three severities as :data:`GRADE_COLORS`; another
    condition's grades along the same green -> red ramp (absent green, present red)."""
    from matplotlib.colors import to_hex, to_rgb

    n = len(condition.grades)
    if n == len(GRADE_COLORS):
        return GRADE_COLORS[g]
    t = g * (len(GRADE_COLORS) - 1) / (n - 1)  # Pfirrmann 1..5 -> 0, 0.5, 1, 1.5, 2
    lo = min(int(t), len(GRADE_COLORS) - 2)
    a, b = np.array(to_rgb(GRADE_COLORS[lo])), np.array(to_rgb(GRADE_COLORS[lo + 1]))
    return to_hex(a + (t - lo) * (b - a))


# ---------------------------------------------------------------------------------- figure


def _slice_for(stack, points: list[np.ndarray], default: int) -> int:
    """Slice showing the given points best: the median of their nearest slices."""
    if not points:
        return default
    zs = [float(stack.patient_to_voxel(p)[0]) for p in points]
    return int(np.clip(np.rint(np.median(zs)), 0, stack.volume.shape[0] - 1))


def _lateral_default(stack, side: str | None) -> int:
    """Without located foramina: a slice a quarter of the stack towards the wanted side."""
    d = stack.volume.shape[0]
    if side is None:
        return d // 2
    towards_left = stack.normal[0] > 0  # slice index grows towards +X, the patient's left
    lateral_high = (side == "left") == towards_left
    return round((0.75 if lateral_high else 0.25) * (d - 1))


def _sagittal_panel(ax, stack, pred: StudyPrediction, condition: str, title: str) -> None:
    """One sagittal slice with every located level of ``condition`` marked and graded."""
    cond = pred.task.condition(condition)
    located = [(lv, pred.point(condition, lv)) for lv in LEVELS]
    located = [(lv, p) for lv, p in located if p is not None]
    z = _slice_for(stack, [p for _, p in located], _lateral_default(stack, cond.side))
    img = stack.volume[z].astype(np.float32)
    ax.imshow(img, cmap="gray", vmin=display_window(img)[0], vmax=display_window(img)[1])
    marks = []
    name = "" if pred.task.is_rsna else f"{cond.title} "
    for lv, p in located:
        pz, py, px = (float(v) for v in stack.patient_to_voxel(p))
        probs = pred.column(f"{condition}_{lv}")
        color = grade_color(cond, grade_of(probs))
        on_slice = abs(pz - z) <= 1.0  # off-slice points are drawn hollow
        ax.plot(px, py, "o", ms=9, mfc=color if on_slice else "none", mec=color, mew=2)
        marks.append((py, px, f"{LEVEL_TITLES[lv]} {name}{_grade_label(probs, cond)}", color))
    _label_column(ax, marks, img.shape)
    ax.set_title(f"{title}\nslice {z + 1}/{stack.volume.shape[0]}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    _mark_orientation(ax, orientation_letters(stack.row_dir, stack.col_dir))


# Text is drawn at zorder 3: the level labels go above the orientation letters (a label beside
# a spine near the image edge can reach the "P" at its middle).
LABEL_ZORDER = 4


def _label_column(ax, marks: list, shape: tuple[int, int]) -> None:
    """Level labels in a column beside the spine, spread apart vertically, with leader lines.

    Neighbouring levels can lie a few pixels apart (or be misplaced on top of each other), so the
    labels are stacked at least a line apart in head-to-foot order instead of on the points.
    """
    if not marks:
        return
    h, w = shape
    marks = sorted(marks)  # by image row
    xs = [m[1] for m in marks]
    to_left = float(np.median(xs)) > 0.6 * w  # the side with more room
    x_text = min(xs) - 0.08 * w if to_left else max(xs) + 0.08 * w
    gap, ys = 0.065 * h, []
    for y, *_ in marks:
        ys.append(max(y, ys[-1] + gap) if ys else y)
    overflow = ys[-1] - (h - 0.03 * h)
    ys = [y - max(overflow, 0.0) for y in ys]
    for (y, x, text, color), ty in zip(marks, ys, strict=True):
        ax.annotate(
            text, (x, y), xytext=(x_text, ty), textcoords="data", ha="right" if to_left else "left",
            va="center", color=color, fontsize=8.5, fontweight="bold", annotation_clip=False,
            # Nearly opaque: over bright CSF a 65% box left the severe red at ~1.5:1 contrast.
            bbox=dict(boxstyle="round,pad=0.2", fc="black", ec="none", alpha=0.9),
            arrowprops=dict(arrowstyle="-", color=color, lw=0.8, alpha=0.8),
            zorder=LABEL_ZORDER,  # over the edge's orientation letter, not garbled by it
        )  # fmt: skip


def _crop_image(column: str, inputs: ReportInputs) -> np.ndarray | None:
    """Centre slice of a crop in display orientation (right-side axial crops are un-mirrored)."""
    crop = inputs.crops.get(column)
    if crop is None:
        return None
    img = np.asarray(crop[crop.shape[0] // 2], dtype=np.float32)
    return img[:, ::-1] if _is_mirrored(column) else img


def _is_mirrored(column: str) -> bool:
    # crops.py turns right-side axial crops so the graded side is on the image right; a reader
    # expects the standard axial view, so the display flips them back.
    return column.startswith("right_subarticular")


def _crop_letters(column: str) -> tuple[str, str, str, str]:
    if "subarticular" in column:
        return ("R", "L", "A", "P")
    return ("A", "P", "S", "I")


def _axial_panel(ax, level: str, pred: StudyPrediction, inputs: ReportInputs) -> None:
    """The axial crop at ``level`` with both subarticular grades."""
    left, right = (f"{c}_subarticular_stenosis_{level}" for c in ("left", "right"))
    img = _crop_image(left, inputs)
    img = _crop_image(right, inputs) if img is None else img
    pl, pr = pred.column(left), pred.column(right)
    title = f"{LEVEL_TITLES[level]} axial\nR: {_grade_label(pr)} | L: {_grade_label(pl)}"
    if img is not None and float(np.ptp(img)) == 0.0:
        # The located level fell outside the axial images: the model was shown an empty crop.
        _placeholder(ax, "empty crop: the level lies\noutside the axial images")
        ax.set_title(title, fontsize=9)
        return
    if img is None:
        _placeholder(ax, "no axial slice\nat this level\n(prior)")
        ax.set_title(title, fontsize=9)
        return
    lo, hi = display_window(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    _mark_orientation(ax, _crop_letters(left))


def _expected_severity(p: np.ndarray) -> float:
    """The expected grade on a 0..1 scale (RSNA: (p_moderate + 2 p_severe) / 2)."""
    return float(np.dot(np.arange(len(p)), p) / (len(p) - 1))


def _saliency_panel(ax, level: str, pred: StudyPrediction, inputs: ReportInputs) -> None:
    """Where the model looked for the most severe finding at ``level`` (saliency over the crop)."""
    have = inputs.crops if inputs.saliency_fn is not None else inputs.saliency
    cols = [f"{c}_{level}" for c in pred.task.condition_names if f"{c}_{level}" in have]
    # A crop whose centre slice is empty (the level fell outside the images) shows nothing.
    cols = [c for c in cols if (im := _crop_image(c, inputs)) is not None and float(np.ptp(im)) > 0]
    col = max(cols, key=lambda c: _expected_severity(pred.column(c))) if cols else None
    heat = inputs.saliency_of(col) if col is not None else None
    if col is None or heat is None:
        _placeholder(ax, "no crop at\nthis level")
        ax.set_title(f"{LEVEL_TITLES[level]}: attention", fontsize=9)
        return
    img = _crop_image(col, inputs)
    heat = np.asarray(heat, dtype=np.float32)
    heat = heat[:, ::-1] if _is_mirrored(col) else heat
    # Colour only the top fifth of the map, so the anatomy underneath stays readable.
    cut = float(np.percentile(heat, 80))
    heat = (heat - cut) / max(float(np.percentile(heat, 99.5)) - cut, 1e-12)
    lo, hi = display_window(img)
    ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
    ax.imshow(np.ma.masked_less_equal(heat, 0), cmap="inferno", alpha=0.5, vmin=0, vmax=1)
    cond = pred.task.column_condition(col)
    label = _grade_label(pred.column(col), cond)
    short = SHORT_CONDITION.get(cond.name, cond.title)
    ax.set_title(f"{LEVEL_TITLES[level]} {short}: {label}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    _mark_orientation(ax, _crop_letters(col))


def _grade_grid(ax, pred: StudyPrediction) -> None:
    """Every grade: levels down, conditions across; colour = grade, strength = its probability."""
    from matplotlib.colors import to_rgb

    task = pred.task
    rgba = np.zeros((len(task.levels), len(task.conditions), 4))
    texts = []
    for i, lv in enumerate(task.levels):
        for j, c in enumerate(task.conditions):
            column = f"{c.name}_{lv}"
            p = pred.column(column)
            g = grade_of(p)
            rgba[i, j, :3] = to_rgb(grade_color(c, g))
            rgba[i, j, 3] = 0.25 + 0.75 * float(p.max())  # a confident grade is a solid cell
            text = f"{SHORT_GRADE[g] if c.grades == SEVERITIES else c.grades[g]}\n{100 * p[g]:.0f}%"
            if pred.source[task.column_index(column)] != "model":
                text += "\n(prior)"
            texts.append((j, i, text))
    ax.imshow(rgba, aspect="auto")
    for j, i, text in texts:
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    names = [SHORT_CONDITION.get(c.name, c.title) for c in task.conditions]
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(task.levels)), [LEVEL_TITLES[lv] for lv in task.levels], fontsize=9)
    ax.set_title("Grades (most probable class)", fontsize=10)


def study_figure(
    pred: StudyPrediction, inputs: ReportInputs, path: Path, cautions: Sequence[str] = ()
) -> Path:
    """Write the study's PNG figure (matplotlib, Agg backend) and return its path.

    Probabilities are shown with the training's class-weight lean removed (clinical.deweight).
    ``cautions`` (e.g. a phantom-trained run's) go under the title: the figure travels alone
    (the service files it into the PACS as a secondary capture).
    """
    import matplotlib.pyplot as plt

    fig = build_figure(pred, inputs, cautions)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor="white")
    plt.close(fig)
    return path


_FIG_W, _FIG_H = 17.0, 14.0  # inches; 1360 x 1120 px at the 80 dpi figures are saved at
_CAUTION_PT = 11.0


def build_figure(pred: StudyPrediction, inputs: ReportInputs, cautions: Sequence[str] = ()):
    """The study's matplotlib figure: RSNA's panels (:func:`_rsna_panels`), or for another task
    the sagittal view of its discs, its grade table and every level's crop
    (:func:`_task_panels`)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pred = replace(pred, probs=clinical_probs(pred))
    fig = plt.figure(figsize=(_FIG_W, _FIG_H), dpi=80, facecolor="white")
    lines = [line for c in cautions for line in textwrap.wrap(c, 150)]
    # The panels start below the cautions: each caution line takes 1.25 x its font size, and
    # the panels' titles (two lines of 10 pt above the axes) must stay clear of the last one.
    line_h = 1.25 * _CAUTION_PT / (72.0 * _FIG_H)
    top = min(0.93, 0.958 - len(lines) * line_h - 0.035) if lines else 0.93
    fig.subplots_adjust(left=0.05, right=0.98, top=top, bottom=0.04)
    if pred.task.is_rsna:
        _rsna_panels(fig, pred, inputs, top)
    else:
        _task_panels(fig, pred, inputs, top)
    fig.suptitle(f"Study {pred.study_id}", fontsize=15, fontweight="bold")
    if lines:
        fig.text(0.5, 0.958, "\n".join(lines), ha="center", va="top", fontsize=_CAUTION_PT,
                 color="#8a4b00")  # fmt: skip
    weights = sorted({w for c in pred.task.conditions for w in c.class_weights})
    lean = (
        f" Probabilities with the training class weights ({'/'.join(f'{w:g}' for w in weights)}) "
        "removed."
        if len(weights) > 1
        else ""
    )
    fig.text(
        0.5, 0.005,
        f"Markers: filled = on the shown slice, hollow = nearby slice.{lean} Research software, "
        "not for diagnostic use.",
        ha="center", fontsize=9, color="#555555",
    )  # fmt: skip
    return fig


def _rsna_panels(fig, pred: StudyPrediction, inputs: ReportInputs, top: float) -> None:
    """Sagittal T2 canal, T1 foramina, grade grid; axial crops and saliency at every level."""
    gs = fig.add_gridspec(3, 5, height_ratios=[3.0, 1.3, 1.3], hspace=0.32, wspace=0.15)
    row = gs[0, :].subgridspec(1, 4, width_ratios=[1, 1, 1, 1.05], wspace=0.22)
    panels = [
        (SAG_T2, "spinal_canal_stenosis", "Sagittal T2: spinal canal"),
        (SAG_T1, "right_neural_foraminal_narrowing", "Sagittal T1: right foramina"),
        (SAG_T1, "left_neural_foraminal_narrowing", "Sagittal T1: left foramina"),
    ]
    for k, (desc, condition, title) in enumerate(panels):
        ax = fig.add_subplot(row[0, k])
        stacks = list(inputs.stacks.get(desc, []))
        if stacks:
            _sagittal_panel(ax, stacks[0], pred, condition, title)
        else:
            _placeholder(ax, f"no {desc} series:\ngrades from the training prior")
            ax.set_title(title, fontsize=10)
    _grade_grid(fig.add_subplot(row[0, 3]), pred)
    for j, lv in enumerate(LEVELS):
        _axial_panel(fig.add_subplot(gs[1, j]), lv, pred, inputs)
        _saliency_panel(fig.add_subplot(gs[2, j]), lv, pred, inputs)
    for r, text in ((1, "Axial T2 at each level"), (2, "Where the model looked (saliency)")):
        y = gs[r, 0].get_position(fig).y1 + 0.035
        fig.text(0.02, y, text, fontsize=11, fontweight="bold", color="#333333")


def _task_panels(fig, pred: StudyPrediction, inputs: ReportInputs, top: float) -> None:
    """Another task: the first condition's series with every level marked and graded (for
    SPIDER's discs: Pfirrmann at each disc centre), the grade table, and per level the crop a
    grader read with every grade of that level, then where the model looked."""
    task = pred.task
    first = task.conditions[0]
    gs = fig.add_gridspec(3, 5, height_ratios=[3.0, 1.3, 1.3], hspace=0.32, wspace=0.15)
    row = gs[0, :].subgridspec(1, 2, width_ratios=[1.2, 1.0], wspace=0.22)
    ax = fig.add_subplot(row[0, 0])
    stacks = list(inputs.stacks.get(first.series, []))
    title = f"{first.series}: {first.title}"
    if stacks:
        _sagittal_panel(ax, stacks[0], pred, first.name, title)
    else:
        _placeholder(ax, f"no {first.series} series:\ngrades from the training prior")
        ax.set_title(title, fontsize=10)
    _grade_grid(fig.add_subplot(row[0, 1]), pred)
    for j, lv in enumerate(task.levels):
        _task_crop_panel(fig.add_subplot(gs[1, j]), lv, pred, inputs)
        _saliency_panel(fig.add_subplot(gs[2, j]), lv, pred, inputs)
    for r, text in ((1, f"{first.series} at each level"), (2, "Where the model looked")):
        y = gs[r, 0].get_position(fig).y1 + 0.035
        fig.text(0.02, y, text, fontsize=11, fontweight="bold", color="#333333")


def _task_crop_panel(ax, level: str, pred: StudyPrediction, inputs: ReportInputs) -> None:
    """The crop a grader read at ``level`` (centre slice), titled with the level's findings."""
    cols = [f"{c}_{level}" for c in pred.task.condition_names]
    img = next((im for c in cols if (im := _crop_image(c, inputs)) is not None), None)
    found = [t for _, t, _ in _level_findings(pred) if t.startswith(LEVEL_TITLES[level])]
    lines = textwrap.wrap(found[0] if found else LEVEL_TITLES[level], 40)
    title = "\n".join(lines[:2]) + (" ..." if len(lines) > 2 else "")
    if img is None or float(np.ptp(img)) == 0.0:
        _placeholder(ax, "no crop at\nthis level\n(prior)")
    else:
        lo, hi = display_window(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
        ax.set_xticks([])
        ax.set_yticks([])
        _mark_orientation(ax, _crop_letters(cols[0]))
    ax.set_title(title, fontsize=8.5)


# -------------------------------------------------------------------------------- saliency


def input_saliency(
    score_fn: Callable[[torch.Tensor], torch.Tensor], crop: np.ndarray, sigma_px: float = 2.0
) -> np.ndarray:
    """Where the model looked: |d score / d input| summed over the crop's slices, smoothed.

    ``score_fn`` maps a batch ``(1, S, H, W)`` to a scalar (e.g. the expected severity of the
    target). Input gradients answer "which pixels would change the grade most"; summing over
    slices gives one in-plane map to lay over the centre slice. Gaussian smoothing (``sigma_px``)
    removes the checkerboard of strided convolutions so the map reads as regions, not pixels.
    """
    import torch
    from scipy import ndimage

    x = torch.tensor(np.asarray(crop, dtype=np.float32)[None], requires_grad=True)
    with torch.enable_grad():
        score = score_fn(x)
        (grad,) = torch.autograd.grad(score, x)
    heat = grad[0].abs().sum(dim=0).detach().cpu().numpy().astype(np.float64)
    return ndimage.gaussian_filter(heat, sigma_px) if sigma_px > 0 else heat


# ---------------------------------------------------------------------------- json and html


def clinical_probs(pred: StudyPrediction) -> np.ndarray:
    """``pred.probs`` with each condition's class-weight lean removed (:func:`.clinical.deweight`,
    over the condition's own grades; padding stays zero)."""
    from spinegrade.reporting.clinical import deweight

    if pred.task.is_rsna:
        return deweight(pred.probs)
    out = np.zeros_like(pred.probs, dtype=np.float64)
    for k, column in enumerate(pred.task.columns):
        c = pred.task.column_condition(column)
        out[k, : len(c.grades)] = deweight(pred.probs[k, : len(c.grades)], c.class_weights)
    return out


def grades_payload(pred: StudyPrediction, model_info: Mapping[str, object] | None = None) -> dict:
    """The ``grades.json`` content: per target its probabilities, grade and located point.

    ``probabilities``/``grade`` are the model's (metric-optimal, as in submission.csv);
    ``clinical`` holds them with the class-weight lean removed (what the figure shows). Grades
    are named by the run's task (RSNA: Normal/Mild, Moderate, Severe; SPIDER's discs: Pfirrmann
    1-5, absent/present).
    """
    shown = clinical_probs(pred)
    task = pred.task
    targets = {}
    for k, column in enumerate(task.columns):
        c, level = task.column_condition(column), task.column_level(column)
        n = len(c.grades)
        p, q = pred.probs[k, :n], shown[k, :n]
        point = pred.point(c.name, level)
        targets[column] = {
            "condition": c.name,
            "level": LEVEL_TITLES[level],
            "probabilities": {g: round(float(v), 6) for g, v in zip(c.grades, p, strict=True)},
            "grade": c.grades[grade_of(p)],
            "clinical": {
                "probabilities": {g: round(float(v), 6) for g, v in zip(c.grades, q, strict=True)},
                "grade": c.grades[grade_of(q)],
            },
            "point_lps_mm": None if point is None else [round(float(v), 2) for v in point],
            "source": pred.source[k],
        }
    return {
        "study_id": int(pred.study_id),
        "task": task.name,
        "coordinates": "DICOM patient coordinates (LPS: +x left, +y posterior, +z head), mm",
        "model": dict(model_info or {}),
        "series": {d: list(v) for d, v in pred.series.items()},
        "targets": targets,
        "warnings": list(pred.warnings),
    }


def _findings(pred: StudyPrediction) -> list[tuple[int, str, bool]]:
    """(grade, text, seen by the model) of every Moderate/Severe target, seen and worst first.

    Another task reads like a radiologist's list: one line per level with every ordinal grade
    (Pfirrmann 3) and the binary findings that are present; grade = the line's worst, on the
    0-2 scale of :data:`GRADE_COLORS`.
    """
    if not pred.task.is_rsna:
        return _level_findings(pred)
    out = []
    for k, column in enumerate(LABEL_COLUMNS):
        g = grade_of(pred.probs[k])
        if g > 0:
            condition, level = column[:-6], column[-5:]
            text = f"{LEVEL_TITLES[level]} {SHORT_CONDITION[condition]}: {SHORT_GRADE[g]}"
            out.append((g, text, pred.source[k] == "model"))
    return sorted(out, key=lambda t: (not t[2], -t[0]))


def _level_findings(pred: StudyPrediction) -> list[tuple[int, str, bool]]:
    task, out = pred.task, []
    for level in task.levels:
        parts, worst, seen = [], 0, False
        for c in task.conditions:
            column = f"{c.name}_{level}"
            g = grade_of(pred.column(column))
            seen |= pred.source[task.column_index(column)] == "model"
            if len(c.grades) > 2:
                parts.append(f"{c.title} {c.grades[g]}")
            elif g > 0:
                parts.append(f"{c.title.lower()}" if c.grades[g] == "present" else
                             f"{c.title.lower()} {c.grades[g]}")  # fmt: skip
            else:
                continue
            worst = max(worst, round(g * (len(GRADE_COLORS) - 1) / (len(c.grades) - 1)))
        out.append((worst, f"{LEVEL_TITLES[level]}: {', '.join(parts) or 'no finding'}", seen))
    return out


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px}p.sub{color:#666;margin:0 0 18px}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #ddd;padding:8px;
vertical-align:top;text-align:left}th{background:#f4f4f4;position:sticky;top:0}
img.thumb{width:480px;border:1px solid #ccc}td.fig{width:490px}
td.id{font-weight:bold;font-size:16px}td.folder{font-family:monospace;word-break:break-all}
span.g1{color:#b36b00;font-weight:bold}span.g2{color:#c40000;font-weight:bold}
span.g0{color:#2e7d32}span.prior{color:#888}ul{margin:0;padding-left:18px}li.warn{color:#8a6d00}
.note{color:#777;font-size:12px;margin-top:16px}
p.caution{color:#8a4b00;background:#fff4e0;border-left:4px solid #e0a040;padding:6px 10px}
"""


def _index_row(pred: StudyPrediction, folder: str | None) -> str:
    sid = int(pred.study_id)
    findings = _findings(replace(pred, probs=clinical_probs(pred)))
    items = "".join(
        f'<li><span class="g{g}">{html.escape(t)}</span></li>'
        if seen
        else f'<li><span class="prior">{html.escape(t)} (training prior, not seen)</span></li>'
        for g, t, seen in findings
    )
    items = items or '<li><span class="g0">all levels Normal/Mild</span></li>'
    n_prior = sum(s != "model" for s in pred.source)
    warns = "".join(f'<li class="warn">{html.escape(w)}</li>' for w in pred.warnings)
    prior = (
        f"<p>{n_prior} of {len(pred.source)} grades from the training prior</p>" if n_prior else ""
    )
    if pred.series:
        used = "; ".join(f"{d} {', '.join(map(str, v))}" for d, v in pred.series.items())
        prior += f'<p class="series">series used: {html.escape(used)}</p>'

    where = "" if folder is None else f'<td class="folder">{html.escape(folder)}</td>'
    return (
        f'<tr><td class="id">{sid}<br><a href="{sid}/grades.json">grades.json</a></td>{where}'
        f'<td class="fig"><a href="{sid}/figure.png"><img class="thumb" src="{sid}/thumb.png" '
        f'alt="study {sid}"></a></td><td><ul>{items}</ul>{prior}<ul>{warns}</ul></td></tr>'
    )


def write_index_html(
    report_dir: Path,
    preds: Sequence[StudyPrediction],
    title: str,
    input_folders: Mapping[int, str] | None = None,
    model_lines: Sequence[str] = (),
    cautions: Sequence[str] = (),
) -> Path:
    """``index.html``: every study with its thumbnail and findings; opens without a server.

    ``input_folders`` (study id -> folder relative to the input, as in studies.csv) adds an
    "input folder" column, so a hashed study id can be traced back to the files it came from.
    ``model_lines`` describe the models (e.g. where their backbones' weights came from);
    ``cautions`` (e.g. a phantom-trained run's) stand out above the table.
    """
    folders = None if input_folders is None else {int(k): v for k, v in input_folders.items()}
    rows = "\n".join(
        _index_row(p, None if folders is None else folders.get(int(p.study_id), ""))
        for p in sorted(preds, key=lambda p: p.study_id)
    )
    folder_head = "" if folders is None else "<th>Input folder</th>"
    task = preds[0].task if preds else RSNA_2024
    if task.is_rsna:
        lean = (
            "the models are trained on the competition's weighted loss (Moderate x2, Severe x4), "
            "so their probabilities lean towards the worse grades: shown here with that lean "
            "removed (p / weight, renormalised); submission.csv keeps the metric-optimal values."
        )
        findings_head = "Findings (Moderate or worse)"
    else:
        lean = f"task {task.name}: {', '.join(c.title for c in task.conditions)}."
        findings_head = "Findings by level"
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='sub'>{len(preds)} studies. Click a thumbnail "
        "for the full figure. Grades are the most probable class of the fold ensemble; "
        f"{html.escape(lean)}</p>"
        + "".join(f"<p class='sub'>{html.escape(line)}</p>" for line in model_lines)
        + "".join(f"<p class='caution'>{html.escape(line)}</p>" for line in cautions)
        + f"<table><thead><tr><th>Study</th>{folder_head}<th>Figure</th>"
        f"<th>{findings_head}</th>"
        f"</tr></thead><tbody>\n{rows}\n</tbody></table>"
        "<p class='note'>Research software, not for diagnostic use.</p></body></html>"
    )
    from spinegrade.util.atomic import write_text

    return write_text(Path(report_dir) / "index.html", doc)


def write_study_report(
    report_dir: Path,
    pred: StudyPrediction,
    inputs: ReportInputs,
    model_info: Mapping[str, object] | None = None,
) -> Path:
    """Write ``REPORT/{study_id}/`` (figure.png, thumb.png, grades.json); returns the folder."""
    from PIL import Image

    folder = Path(report_dir) / str(int(pred.study_id))
    folder.mkdir(parents=True, exist_ok=True)
    figure = study_figure(pred, inputs, folder / "figure.png", (model_info or {}).get("notes", ()))
    with Image.open(figure) as im:
        im.thumbnail((560, 560))
        im.save(folder / "thumb.png")
    from spinegrade.util.atomic import write_json

    write_json(folder / "grades.json", grades_payload(pred, model_info))
    return folder
