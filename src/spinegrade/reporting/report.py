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
    CONDITION_SIDE,
    CONDITIONS,
    DISPLAY_AXIS_LETTERS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    SAG_T1,
    SAG_T2,
    SEVERITIES,
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

    ``probs`` rows follow :data:`spinegrade.task.LABEL_COLUMNS`; ``source`` says per column
    whether the model saw it (``"model"``) or the training prior filled it in (``"prior"``).
    ``points`` is ``(5 conditions, 5 levels, 3)`` LPS mm with NaN where not located.
    ``series`` names the series each description was read from (a study may hold duplicates).
    """

    study_id: int
    probs: np.ndarray
    source: list[str]
    points: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    series: dict[str, list[int]] = field(default_factory=dict)  # description -> series read

    def column(self, name: str) -> np.ndarray:
        return self.probs[LABEL_COLUMNS.index(name)]

    def point(self, condition: str, level: str) -> np.ndarray | None:
        if self.points is None:
            return None
        p = self.points[CONDITIONS.index(condition), LEVELS.index(level)]
        return None if np.isnan(p).any() else p


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


def _grade_label(p: np.ndarray) -> str:
    g = grade_of(p)
    return f"{SHORT_GRADE[g]} {100 * p[g]:.0f}%"


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
    located = [(lv, pred.point(condition, lv)) for lv in LEVELS]
    located = [(lv, p) for lv, p in located if p is not None]
    z = _slice_for(
        stack, [p for _, p in located], _lateral_default(stack, CONDITION_SIDE[condition])
    )
    img = stack.volume[z].astype(np.float32)
    ax.imshow(img, cmap="gray", vmin=display_window(img)[0], vmax=display_window(img)[1])
    marks = []
    for lv, p in located:
        pz, py, px = (float(v) for v in stack.patient_to_voxel(p))
        probs = pred.column(f"{condition}_{lv}")
        color = GRADE_COLORS[grade_of(probs)]
        on_slice = abs(pz - z) <= 1.0  # off-slice points are drawn hollow
        ax.plot(px, py, "o", ms=9, mfc=color if on_slice else "none", mec=color, mew=2)
        marks.append((py, px, f"{LEVEL_TITLES[lv]} {_grade_label(probs)}", color))
    _label_column(ax, marks, img.shape)
    ax.set_title(f"{title}\nslice {z + 1}/{stack.volume.shape[0]}", fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    _mark_orientation(ax, orientation_letters(stack.row_dir, stack.col_dir))


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
            bbox=dict(boxstyle="round,pad=0.2", fc="black", ec="none", alpha=0.65),
            arrowprops=dict(arrowstyle="-", color=color, lw=0.8, alpha=0.8),
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
    return float(p[1] + 2.0 * p[2])


def _saliency_panel(ax, level: str, pred: StudyPrediction, inputs: ReportInputs) -> None:
    """Where the model looked for the most severe finding at ``level`` (saliency over the crop)."""
    have = inputs.crops if inputs.saliency_fn is not None else inputs.saliency
    cols = [f"{c}_{level}" for c in CONDITIONS if f"{c}_{level}" in have]
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
    condition = col[: -len(level) - 1]
    label = _grade_label(pred.column(col))
    ax.set_title(f"{LEVEL_TITLES[level]} {SHORT_CONDITION[condition]}: {label}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    _mark_orientation(ax, _crop_letters(col))


def _grade_grid(ax, pred: StudyPrediction) -> None:
    """All 25 grades: levels down, conditions across; colour = grade, strength = its probability."""
    from matplotlib.colors import to_rgb

    rgba = np.zeros((len(LEVELS), len(CONDITIONS), 4))
    for i, lv in enumerate(LEVELS):
        for j, c in enumerate(CONDITIONS):
            p = pred.column(f"{c}_{lv}")
            rgba[i, j, :3] = to_rgb(GRADE_COLORS[grade_of(p)])
            rgba[i, j, 3] = 0.25 + 0.75 * float(p.max())  # a confident grade is a solid cell
    ax.imshow(rgba, aspect="auto")
    for i, lv in enumerate(LEVELS):
        for j, c in enumerate(CONDITIONS):
            k = LABEL_COLUMNS.index(f"{c}_{lv}")
            p = pred.probs[k]
            text = f"{SHORT_GRADE[grade_of(p)]}\n{100 * p[grade_of(p)]:.0f}%"
            if pred.source[k] != "model":
                text += "\n(prior)"
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(CONDITIONS)), [SHORT_CONDITION[c] for c in CONDITIONS], rotation=30,
                  ha="right", fontsize=8)  # fmt: skip
    ax.set_yticks(range(len(LEVELS)), [LEVEL_TITLES[lv] for lv in LEVELS], fontsize=9)
    ax.set_title("Grades (most probable class)", fontsize=10)


def study_figure(
    pred: StudyPrediction, inputs: ReportInputs, path: Path, cautions: Sequence[str] = ()
) -> Path:
    """Write the study's PNG figure (matplotlib, Agg backend) and return its path.

    Probabilities are shown with the training's class-weight lean removed (clinical.deweight).
    ``cautions`` (e.g. a phantom-trained run's) go under the title: the figure travels alone
    (the service files it into the PACS as a secondary capture).
    """
    import matplotlib

    from spinegrade.reporting.clinical import deweight

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    pred = replace(pred, probs=deweight(pred.probs))
    fig = plt.figure(figsize=(17, 14), dpi=80, facecolor="white")
    fig.subplots_adjust(left=0.05, right=0.98, top=0.93, bottom=0.04)
    gs = fig.add_gridspec(3, 5, height_ratios=[3.0, 1.3, 1.3], hspace=0.32, wspace=0.15)
    top = gs[0, :].subgridspec(1, 4, width_ratios=[1, 1, 1, 1.05], wspace=0.22)
    panels = [
        (SAG_T2, "spinal_canal_stenosis", "Sagittal T2: spinal canal"),
        (SAG_T1, "right_neural_foraminal_narrowing", "Sagittal T1: right foramina"),
        (SAG_T1, "left_neural_foraminal_narrowing", "Sagittal T1: left foramina"),
    ]
    for k, (desc, condition, title) in enumerate(panels):
        ax = fig.add_subplot(top[0, k])
        stacks = list(inputs.stacks.get(desc, []))
        if stacks:
            _sagittal_panel(ax, stacks[0], pred, condition, title)
        else:
            _placeholder(ax, f"no {desc} series:\ngrades from the training prior")
            ax.set_title(title, fontsize=10)
    _grade_grid(fig.add_subplot(top[0, 3]), pred)
    for j, lv in enumerate(LEVELS):
        _axial_panel(fig.add_subplot(gs[1, j]), lv, pred, inputs)
        _saliency_panel(fig.add_subplot(gs[2, j]), lv, pred, inputs)
    for row, text in ((1, "Axial T2 at each level"), (2, "Where the model looked (saliency)")):
        y = gs[row, 0].get_position(fig).y1 + 0.035
        fig.text(0.02, y, text, fontsize=11, fontweight="bold", color="#333333")
    fig.suptitle(f"Study {pred.study_id}", fontsize=15, fontweight="bold")
    if cautions:
        text = "\n".join(textwrap.fill(c, 150) for c in cautions)
        fig.text(0.5, 0.958, text, ha="center", va="top", fontsize=11, color="#8a4b00")
    fig.text(
        0.5, 0.005,
        "Markers: filled = on the shown slice, hollow = nearby slice. Probabilities with the "
        "training class weights (1/2/4) removed. Research software, not for diagnostic use.",
        ha="center", fontsize=9, color="#555555",
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, facecolor="white")
    plt.close(fig)
    return path


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


def grades_payload(pred: StudyPrediction, model_info: Mapping[str, object] | None = None) -> dict:
    """The ``grades.json`` content: per target its probabilities, grade and located point.

    ``probabilities``/``grade`` are the model's (metric-optimal, as in submission.csv);
    ``clinical`` holds them with the class-weight lean removed (what the figure shows).
    """
    from spinegrade.reporting.clinical import deweight

    shown = deweight(pred.probs)
    targets = {}
    for k, column in enumerate(LABEL_COLUMNS):
        condition, level = column[:-6], column[-5:]
        p = pred.probs[k]
        point = pred.point(condition, level)
        targets[column] = {
            "condition": condition,
            "level": LEVEL_TITLES[level],
            "probabilities": {
                sev: round(float(v), 6) for sev, v in zip(SEVERITIES, p, strict=True)
            },
            "grade": SEVERITIES[grade_of(p)],
            "clinical": {
                "probabilities": {
                    sev: round(float(v), 6) for sev, v in zip(SEVERITIES, shown[k], strict=True)
                },
                "grade": SEVERITIES[grade_of(shown[k])],
            },
            "point_lps_mm": None if point is None else [round(float(v), 2) for v in point],
            "source": pred.source[k],
        }
    return {
        "study_id": int(pred.study_id),
        "coordinates": "DICOM patient coordinates (LPS: +x left, +y posterior, +z head), mm",
        "model": dict(model_info or {}),
        "series": {d: list(v) for d, v in pred.series.items()},
        "targets": targets,
        "warnings": list(pred.warnings),
    }


def _findings(pred: StudyPrediction) -> list[tuple[int, str, bool]]:
    """(grade, text, seen by the model) of every Moderate/Severe target, seen and worst first."""
    out = []
    for k, column in enumerate(LABEL_COLUMNS):
        g = grade_of(pred.probs[k])
        if g > 0:
            condition, level = column[:-6], column[-5:]
            text = f"{LEVEL_TITLES[level]} {SHORT_CONDITION[condition]}: {SHORT_GRADE[g]}"
            out.append((g, text, pred.source[k] == "model"))
    return sorted(out, key=lambda t: (not t[2], -t[0]))


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
    from spinegrade.reporting.clinical import deweight

    sid = int(pred.study_id)
    findings = _findings(replace(pred, probs=deweight(pred.probs)))
    items = "".join(
        f'<li><span class="g{g}">{html.escape(t)}</span></li>'
        if seen
        else f'<li><span class="prior">{html.escape(t)} (training prior, not seen)</span></li>'
        for g, t, seen in findings
    )
    items = items or '<li><span class="g0">all levels Normal/Mild</span></li>'
    n_prior = sum(s != "model" for s in pred.source)
    warns = "".join(f'<li class="warn">{html.escape(w)}</li>' for w in pred.warnings)
    prior = f"<p>{n_prior} of 25 grades from the training prior</p>" if n_prior else ""
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
    doc = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='sub'>{len(preds)} studies. Click a thumbnail "
        "for the full figure. Grades are the most probable class of the fold ensemble; the "
        "models are trained on the competition's weighted loss (Moderate x2, Severe x4), so their "
        "probabilities lean towards the worse grades: shown here with that lean removed "
        "(p / weight, renormalised); submission.csv keeps the metric-optimal values.</p>"
        + "".join(f"<p class='sub'>{html.escape(line)}</p>" for line in model_lines)
        + "".join(f"<p class='caution'>{html.escape(line)}</p>" for line in cautions)
        + f"<table><thead><tr><th>Study</th>{folder_head}<th>Figure</th>"
        "<th>Findings (Moderate or worse)</th>"
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
