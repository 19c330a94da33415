"""The real-anatomy benches: how they score located levels, and their command lines.

Every figure of #12 (BENCHMARKS.md, "Real anatomy") comes from this scoring, so it is checked on
spines whose answer is known: a canal point behind its disc scores 0 mm along the spine whatever
the lordosis, and a point on the neighbouring disc is misnamed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_real_anatomy_seeds import parse_args
from spinegrade.evaluation.anatomy import score_case, spine_axes, summarise
from spinegrade.task import LEVELS


def _lordotic_spine(radius: float = 150.0, spacing: float = 36.0) -> tuple[np.ndarray, np.ndarray]:
    """Disc centres L1/L2..L5/S1 (LPS mm, head first) on an arc bulging forwards, as a lordosis
    does, and each disc's outward normal in the sagittal plane (towards the back)."""
    angles = (np.arange(5) - 2) * spacing / radius  # equal arc steps, head at negative angles
    # LPS: +y is posterior, +z superior; the arc's centre lies behind the spine.
    centres = np.stack([np.zeros(5), -radius * np.cos(angles), -radius * np.sin(angles)], axis=1)
    backwards = -centres / radius  # from each disc towards the arc's centre: posterior
    return centres, backwards


def test_axes_follow_the_curve_of_the_spine_towards_the_head():
    centres, backwards = _lordotic_spine()
    axes = spine_axes(centres)
    assert np.allclose(np.linalg.norm(axes, axis=1), 1.0)
    assert (axes[:, 2] > 0.8).all()  # towards the head (LPS +z)
    # Perpendicular to the line from the disc into the canal: the tangent of the curve.
    assert np.abs(np.einsum("ij,ij->i", axes, backwards)).max() < 0.02


def test_a_canal_point_behind_its_disc_scores_zero_and_a_neighbour_is_misnamed():
    centres, backwards = _lordotic_spine()
    canal = centres + 20.0 * backwards  # the canal lies ~2 cm behind the disc centre
    rows = score_case(canal, centres)
    assert [r["nearest"] for r in rows] == list(LEVELS)
    assert max(abs(r["dist_mm"]) for r in rows) < 1.0
    # L2/L3 placed on the L3/L4 disc (one disc towards the feet), L5/S1 not found at all.
    wrong = canal.copy()
    wrong[1] = canal[2]
    wrong[4] = np.nan
    rows = score_case(wrong, centres)
    assert rows[1]["nearest"] == LEVELS[2]
    # One disc towards the feet: on the canal's arc (20 mm inside the discs' 150 mm one), seen
    # along L2/L3's tangent.
    assert rows[1]["dist_mm"] == pytest.approx(-130.0 * np.sin(36.0 / 150.0), abs=0.01)
    assert not rows[4]["found"]
    table = summarise(pd.DataFrame(rows).assign(case="a"))
    overall = table.iloc[-1]
    assert overall["misnamed"] == 2 and overall["within_5mm"] == pytest.approx(3 / 5)


def test_seeds_bench_takes_overrides_after_its_options():
    # The form its docstring and BENCHMARKS.md give: options, then "--", then the design.
    args = parse_args(
        ["D", "C", "O", "--config", "default", "--seeds", "42", "7", "--jobs", "1", "--",
         "localizer.pretrained=false", "localizer.epochs=1"]
    )  # fmt: skip
    assert (str(args.data), str(args.cache), str(args.out)) == ("D", "C", "O")
    assert args.seeds == [42, 7] and args.jobs == 1 and args.config == "default"
    assert args.overrides == ["localizer.pretrained=false", "localizer.epochs=1"]
    bare = parse_args(["D", "C", "O"])
    assert bare.overrides == [] and bare.seeds == [42, 7, 11, 1, 2, 3]


def _run_of_imported_cases(tmp_path: Path, n: int) -> Path:
    """A run folder whose data folder is an imported real set of ``n`` cases: studies 7, 8, ...
    are cases spider_1, spider_2, ... (its cases.csv), one patient each."""
    from spinegrade.config import load_config, save_config

    data = tmp_path / "imported"
    data.mkdir()
    pd.DataFrame({"study_id": [7 + k for k in range(n)],
                  "case_id": [f"spider_{k + 1}" for k in range(n)],
                  "patient_id": [f"p{k}" for k in range(n)]}).to_csv(
        data / "cases.csv", index=False)  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("quick")
    cfg.data.data_dir = str(data)
    save_config(cfg, run / "config.yaml")
    return run


def test_oof_mode_scores_a_runs_own_points_against_the_real_truth(tmp_path):
    # A run trained on an imported real set: its oof_points.csv is matched to the real cases
    # through the data folder's cases.csv, and scored without running a model.
    import subprocess

    from spinegrade.task import LEVEL_TITLES

    centres, backwards = _lordotic_spine()
    run = _run_of_imported_cases(tmp_path, 2)
    real = tmp_path / "real"
    real.mkdir()
    truth = [
        {"case_id": case, "level": LEVEL_TITLES[lv], "x_mm": c[0], "y_mm": c[1], "z_mm": c[2]}
        for case in ("spider_1", "spider_2", "spider_3")  # spider_3: not in the run
        for lv, c in zip(LEVELS, centres, strict=True)
    ]
    pd.DataFrame(truth).to_csv(real / "truth.csv", index=False)
    canal = centres + 20.0 * backwards
    wrong = canal.copy()
    wrong[1] = centres[2] + 20.0 * backwards[2]  # study 8: L2/L3 put on the L3/L4 disc
    rows = []
    for sid, pts in ((7, canal), (8, wrong)):
        for j, lv in enumerate(LEVELS):
            rows.append([sid, lv, "canal", *pts[j], 0])
            rows.append([sid, lv, "disc_centre", *(centres[j] + [0, 3.0, 0]), 0])  # 3 mm off
    cols = ["study_id", "level", "target", "x_mm", "y_mm", "z_mm", "fold"]
    pd.DataFrame(rows, columns=cols).to_csv(run / "oof_points.csv", index=False)
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_real_anatomy.py"
    done = subprocess.run(
        [sys.executable, str(bench), str(run), str(real), "--oof", "--pictures", "none"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "out-of-fold points of 2 real cases" in out
    assert "misnamed: spider_2 l2_l3->l3_l4" in out
    table = out.split("mid-plane")[1]
    all_row = next(line for line in table.splitlines() if line.strip().startswith("all"))
    # 10 levels, 9 within 5 mm of their own disc's mid-plane, 1 misnamed.
    assert (
        all_row.split()[1:2] == ["10"] and "0.90" in all_row.split() and all_row.split()[6] == "1"
    )
    assert "disc centres: 10 located" in out and "within 5 mm 100%" in out


def test_a_tilted_disc_is_judged_in_its_own_plane_where_its_canal_point_is_known():
    # L5/S1's wedge-shaped disc is tilted against the spine's curve: a canal point placed on the
    # disc's own long axis (as SPIDER's are) is on its mid-plane, though off the spine-axis plane.
    from spinegrade.evaluation.anatomy import disc_axes

    centres, backwards = _lordotic_spine()
    tilt = np.deg2rad(15.0)  # rotate L5/S1's antero-posterior axis in the sagittal plane
    b = backwards[-1]
    along = np.array([0.0, b[1] * np.cos(tilt) - b[2] * np.sin(tilt),
                      b[1] * np.sin(tilt) + b[2] * np.cos(tilt)])  # fmt: skip
    canal = centres + 25.0 * backwards
    canal[-1] = centres[-1] + 25.0 * along
    axes = disc_axes(centres, canal)
    assert np.allclose(np.linalg.norm(axes, axis=1), 1.0) and (axes[:, 2] > 0.5).all()
    assert abs(axes[-1] @ along) < 1e-9  # the normal is across the disc's own axis
    own = score_case(canal, centres, canal)
    across = score_case(canal, centres)
    assert max(abs(r["dist_mm"]) for r in own) < 1e-6
    assert abs(across[-1]["dist_mm"]) > 5.0  # 25 mm x sin(15 deg): the spine-axis plane misses
    assert [r["nearest"] for r in own] == list(LEVELS)


def test_held_out_mode_gives_each_real_case_the_fold_that_never_saw_it(tmp_path):
    import importlib.util

    run = _run_of_imported_cases(tmp_path, 3)
    pd.DataFrame({"study_id": [1, 7, 8, 9], "fold": [0, 1, 0, 2]}).to_csv(
        run / "folds.csv", index=False
    )
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_real_anatomy.py"
    spec = importlib.util.spec_from_file_location("bench_real_anatomy", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.held_out_folds(run, [0, 1, 2]) == {"spider_1": 1, "spider_2": 0, "spider_3": 2}
    assert bench.held_out_folds(run, [0]) == {"spider_2": 0}  # only the chosen folds' cases
    with pytest.raises(SystemExit, match="did not train on these real cases"):
        bench.held_out_folds(run, [3])
