"""Reports: figure, grades.json and index.html from a hand-made study with known geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spinegrade.inference.ensemble import PHANTOM_CAUTION
from spinegrade.preprocessing.cache import CachedStack
from spinegrade.reporting.report import (
    ReportInputs,
    StudyPrediction,
    grades_payload,
    input_saliency,
    orientation_letters,
    write_index_html,
    write_study_report,
)
from spinegrade.task import AX_T2, CONDITIONS, LABEL_COLUMNS, LEVELS, SAG_T1, SAG_T2


def sagittal_stack(description: str, n: int = 9, size: int = 64) -> CachedStack:
    """A sagittal stack 4 mm apart: rows run A->P, columns H->F (standard display).

    The normal is cross(A->P, H->F) = -X, so slice positions increase towards the patient's right.
    """
    vol = np.zeros((n, size, size), dtype=np.uint8)
    vol[:, :, size // 2 - 2 : size // 2 + 2] = 220  # a bright vertical band (the canal)
    for k in range(5):  # five discs
        vol[:, 8 + 11 * k : 11 + 11 * k, 10:28] = 120
    positions = np.array([[16.0 - 4.0 * z, -32.0, 32.0] for z in range(n)])
    return CachedStack(
        volume=vol,
        positions=positions,
        row_dir=np.array([0.0, 1.0, 0.0]),
        col_dir=np.array([0.0, 0.0, -1.0]),
        spacing=(1.0, 1.0),
        orig_shape=(size, size),
        instance_numbers=np.arange(1, n + 1),
        study_id=7,
        series_id=1 if description == SAG_T1 else 2,
        description=description,
        plane="sagittal",
    )


def level_points(x_mm: float) -> np.ndarray:
    """(5, 5, 3) points: every condition at the same heights, at ``x_mm`` left of the midline."""
    pts = np.full((len(CONDITIONS), len(LEVELS), 3), np.nan)
    for j in range(len(LEVELS)):
        for i, c in enumerate(CONDITIONS):
            side = 1.0 if c.startswith("left") else -1.0 if c.startswith("right") else 0.0
            pts[i, j] = [side * x_mm, -32.0 + 32.0, 32.0 - (9.5 + 11 * j)]
    return pts


def make_prediction(study_id: int = 7, severe_column: str = "spinal_canal_stenosis_l4_l5"):
    probs = np.tile([0.8, 0.15, 0.05], (25, 1))
    probs[LABEL_COLUMNS.index(severe_column)] = [0.1, 0.2, 0.7]
    source = ["model"] * 25
    source[LABEL_COLUMNS.index("left_subarticular_stenosis_l1_l2")] = "prior"
    return StudyPrediction(
        study_id, probs, source, level_points(8.0), warnings=["study 7: no note"]
    )


def test_orientation_letters_follow_dicom_directions() -> None:
    # Standard sagittal: anterior left, posterior right, head up, foot down.
    assert orientation_letters(np.array([0, 1, 0]), np.array([0, 0, -1])) == ("A", "P", "S", "I")
    # Standard axial: patient right on the viewer's left.
    assert orientation_letters(np.array([1, 0, 0]), np.array([0, 1, 0])) == ("R", "L", "A", "P")


def test_grades_payload_has_every_target() -> None:
    payload = grades_payload(make_prediction(), {"folds": [0, 1]})
    assert list(payload["targets"]) == list(LABEL_COLUMNS)
    t = payload["targets"]["spinal_canal_stenosis_l4_l5"]
    assert t["grade"] == "Severe" and t["level"] == "L4/L5"
    assert abs(sum(t["probabilities"].values()) - 1) < 1e-6
    assert t["point_lps_mm"] == [0.0, 0.0, pytest.approx(32.0 - 42.5)]
    assert payload["targets"]["left_subarticular_stenosis_l1_l2"]["source"] == "prior"
    json.dumps(payload)  # plain JSON types only


def test_saliency_points_at_the_informative_pixels() -> None:
    crop = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    # A "model" that only reads the top-left quarter of the middle slice.
    grad_before = torch.is_grad_enabled()
    heat = input_saliency(lambda x: (x[:, 1, :8, :8] ** 2).sum(), crop, sigma_px=0)
    assert heat.shape == (16, 16)
    assert heat[8:, :].max() == 0 and heat[:8, 8:].max() == 0 and heat[:8, :8].sum() > 0
    assert torch.is_grad_enabled() == grad_before  # the helper does not leave state behind


def _caution_pixels(im) -> int:
    """Pixels of the caution's dark orange (#8a4b00) in the figure's top tenth."""
    top = np.asarray(im.convert("RGB"))[: im.height // 10].astype(int)
    return int((np.abs(top - [138, 75, 0]).sum(-1) < 60).sum())


def test_full_report_writes_readable_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    crops = {c: rng.random((5, 32, 32)).astype(np.float32) for c in LABEL_COLUMNS}
    del crops["left_subarticular_stenosis_l1_l2"], crops["right_subarticular_stenosis_l1_l2"]
    saliency = {c: rng.random((32, 32)) for c in crops}
    inputs = ReportInputs(
        stacks={SAG_T2: [sagittal_stack(SAG_T2)], SAG_T1: [sagittal_stack(SAG_T1)], AX_T2: []},
        crops=crops,
        saliency=saliency,
    )
    folder = write_study_report(tmp_path, make_prediction(), inputs, {"folds": [0]})
    assert {p.name for p in folder.iterdir()} == {"figure.png", "thumb.png", "grades.json"}
    from PIL import Image

    with Image.open(folder / "figure.png") as im:
        assert im.width > 1000 and im.height > 900
        plain = _caution_pixels(im)
    # A phantom-trained run's caution is drawn under the title: the figure travels alone (the
    # service files it into the PACS), so the caution must be in its pixels.
    noted = write_study_report(
        tmp_path / "noted", make_prediction(), inputs, {"folds": [0], "notes": [PHANTOM_CAUTION]}
    )
    with Image.open(noted / "figure.png") as im:
        assert plain == 0 and _caution_pixels(im) > 500
    # A study with no series at all still gets a figure (placeholders, prior grades).
    bare = make_prediction(8)
    bare.points = None
    write_study_report(tmp_path, bare, ReportInputs())
    index = write_index_html(tmp_path, [make_prediction(), bare], "spinegrade report")
    text = index.read_text()
    assert 'src="7/thumb.png"' in text and 'href="8/grades.json"' in text
    assert "L4/L5 Spinal canal: Severe" in text
    assert "http" not in text.replace("https://", "")  # no external resources
    assert "Input folder" not in text  # no folders given, no column
    with_folders = write_index_html(tmp_path, [make_prediction(), bare], "r", {7: "ward/<case 7>"})
    text = with_folders.read_text()
    assert "<th>Input folder</th>" in text
    assert '<td class="folder">ward/&lt;case 7&gt;</td>' in text  # escaped
    assert '<td class="folder"></td>' in text  # study 8: no folder known


def _title_boxes(fig):
    renderer = fig.canvas.get_renderer()
    return renderer, [
        t.get_window_extent(renderer)
        for ax in fig.axes
        for t in (ax.title, ax._left_title, ax._right_title)
        if t.get_text()
    ]


@pytest.mark.parametrize("n_cautions", [1, 2, 3])
def test_cautions_stay_clear_of_the_panel_titles(n_cautions: int) -> None:
    """A real study without a T1 series (the placeholders' one-line titles sit highest) and
    the cautions of a run: no caution line is drawn over a panel's title."""
    import matplotlib.pyplot as plt

    from spinegrade.inference.ensemble import LOCALIZER_CAUTION, grader_caution
    from spinegrade.reporting.report import build_figure

    demo = grader_caution(["phantom", "real"], ["Sagittal T1"])  # the longest, the demo's
    cautions = [PHANTOM_CAUTION, demo, LOCALIZER_CAUTION]
    inputs = ReportInputs(stacks={SAG_T2: [sagittal_stack(SAG_T2)]})
    fig = build_figure(make_prediction(), inputs, cautions[:n_cautions])
    try:
        renderer, titles = _title_boxes(fig)
        (caution,) = [t for t in fig.texts if t.get_text().startswith(cautions[0][:30])]
        box = caution.get_window_extent(renderer)
        assert box.height > 0 and titles
        assert all(not box.overlaps(t) for t in titles), "a caution covers a panel title"
    finally:
        plt.close(fig)


def test_level_labels_are_drawn_over_the_orientation_letters() -> None:
    """Seen on a real study: a label beside a spine near the image's posterior edge ran under
    the "P" at its middle and read "grade 2 4P2%". Labels go above the edge letters."""
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation

    from spinegrade.reporting.report import build_figure

    fig = build_figure(make_prediction(), ReportInputs(stacks={SAG_T2: [sagittal_stack(SAG_T2)]}))
    try:
        panels = [ax for ax in fig.axes if any(isinstance(t, Annotation) for t in ax.texts)]
        assert panels, "no level labels drawn"
        for ax in panels:
            labels = [t for t in ax.texts if isinstance(t, Annotation)]
            letters = [t for t in ax.texts if t.get_text() in {"A", "P", "S", "I", "R", "L"}]
            assert len(letters) == 4
            assert min(t.get_zorder() for t in labels) > max(t.get_zorder() for t in letters)
    finally:
        plt.close(fig)


def disc_prediction() -> StudyPrediction:
    """SPIDER's disc task: Pfirrmann 4 and bulging at L4/L5, everything else mild."""
    from spinegrade.task import SPIDER_DISCS

    task = SPIDER_DISCS
    probs = np.zeros((len(task.columns), task.n_classes))
    for k, column in enumerate(task.columns):
        c = task.column_condition(column)
        probs[k, : len(c.grades)] = (
            [0.7, 0.3] if len(c.grades) == 2 else [0.1, 0.6, 0.2, 0.05, 0.05]
        )
    probs[task.column_index("pfirrmann_l4_l5"), :5] = [0.0, 0.05, 0.15, 0.7, 0.1]
    probs[task.column_index("disc_bulging_l4_l5"), :2] = [0.2, 0.8]
    source = ["model"] * len(task.columns)
    source[task.column_index("disc_herniation_l1_l2")] = "prior"
    discs = np.array([[0.0, -10.0, 32.0 - (9.5 + 11 * j)] for j in range(len(LEVELS))])
    return StudyPrediction(9, probs, source, None, [], {}, task, discs)


def test_a_task_report_reads_like_a_radiologists_list(tmp_path: Path) -> None:
    """Another task's report: grades.json named by its grades, a line per level in the index,
    the disc centres marked on the sagittal slice with their Pfirrmann grade."""
    import matplotlib.pyplot as plt

    from spinegrade.reporting.report import build_figure

    pred = disc_prediction()
    task = pred.task
    rng = np.random.default_rng(2)
    crops = {c: rng.random((5, 32, 32)).astype(np.float32) for c in task.columns}
    inputs = ReportInputs(stacks={SAG_T2: [sagittal_stack(SAG_T2)]}, crops=crops,
                          saliency={c: rng.random((32, 32)) for c in crops})  # fmt: skip
    folder = write_study_report(tmp_path, pred, inputs, {"folds": [0]})
    payload = json.loads((folder / "grades.json").read_text())
    assert payload["task"] == "spider_discs" and list(payload["targets"]) == list(task.columns)
    pf = payload["targets"]["pfirrmann_l4_l5"]
    assert pf["grade"] == "4" and pf["level"] == "L4/L5"
    assert pf["probabilities"] == {"1": 0.0, "2": 0.05, "3": 0.15, "4": 0.7, "5": 0.1}
    assert pf["clinical"]["probabilities"] == pf["probabilities"]  # equal weights: no lean
    assert pf["point_lps_mm"] == [0.0, -10.0, pytest.approx(32.0 - 42.5)]
    bulging = payload["targets"]["disc_bulging_l4_l5"]
    assert bulging["grade"] == "present" and list(bulging["probabilities"]) == ["absent", "present"]
    assert payload["targets"]["disc_herniation_l1_l2"]["source"] == "prior"

    index = write_index_html(tmp_path, [pred], "disc report").read_text()
    assert "<th>Findings by level</th>" in index
    assert "L4/L5: Pfirrmann grade 4, disc bulging</span>" in index
    assert "L1/L2: Pfirrmann grade 2</span>" in index
    assert "Moderate x2" not in index  # no class-weight lean to explain

    fig = build_figure(pred, inputs)
    try:
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert any(t.startswith("L4/L5 Pfirrmann grade 4 70%") for t in texts)
        assert sum(t.startswith("L") and "Pfirrmann grade" in t for t in texts) == len(LEVELS)
        titles = [ax.get_title() for ax in fig.axes]
        assert any(t.startswith("L4/L5: Pfirrmann grade 4, disc bulging") for t in titles)
        assert not any("axial" in t for t in titles)
    finally:
        plt.close(fig)
