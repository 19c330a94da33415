"""The benches print only what they measured (#26): their pure summary logic, on made-up figures.

Each bench's full run is long or needs a PACS; what decides which figure is printed, what it is
divided by and whether it is called "projected" is checked here without running it.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


# ------------------------------------------------------------------------------ bench_serve


@pytest.fixture(scope="module")
def bench_serve():
    pytest.importorskip("highdicom", reason="pip install 'spinegrade[serve]'")
    pytest.importorskip("dicomweb_client", reason="pip install 'spinegrade[serve]'")
    import bench_serve

    return bench_serve


def test_serve_rates_divide_by_studies_graded_not_uploaded(bench_serve):
    split = np.array([[0.1, 2.0, 1.0], [0.3, 2.0, 1.0]])  # two of four studies graded
    lines = bench_serve.summary(4, 12.0, 3, split, 4.0, ["failed: ValueError: no sagittal"], 60,
                                "threads 1, device cpu")  # fmt: skip
    text = "\n".join(lines)
    assert "4 uploaded, 2 graded, 2 not graded" in lines[0]
    assert "not graded: failed: ValueError: no sagittal" in text
    assert "not graded: 1 never seen by the service" in text
    assert "12.0 s for 2 graded = 10.0 studies/min (6.00 s/study" in text  # 2 / 12 s, not 4 / 12 s
    assert "retrieve 0.20 s" in text
    assert "added by serve: not compared (2 of 4 studies not graded)" in text


def test_serve_compares_with_predict_only_when_all_were_graded(bench_serve):
    split = np.array([[0.1, 2.0, 1.0], [0.3, 2.0, 1.0]])
    lines = bench_serve.summary(2, 10.0, 1, split, 4.0, [], 60, "")
    assert lines[-1] == "added by serve: +3.00 s/study (2.50x predict)"
    assert not any("not graded:" in line for line in lines)


def test_serve_with_nothing_graded_prints_no_rate(bench_serve):
    lines = bench_serve.summary(3, 0.0, 5, np.zeros((0, 3)), 4.0, [], 1, "")
    assert lines[-1] == "serve loop: no study graded, nothing measured"
    assert not any("studies/min" in line for line in lines)


class _FakeService:
    """Grades one study a poll from its second poll on (discovery lags the upload)."""

    def __init__(self) -> None:
        self.rows: list[SimpleNamespace] = []
        self.polls = 0
        self.state = SimpleNamespace(all=lambda: self.rows)

    def poll_once(self) -> dict:
        self.polls += 1
        graded = int(self.polls > 1 and len(self.rows) < 3)
        self.rows += [SimpleNamespace(status="graded")] * graded
        return {"seen": 3, "graded": graded, "failed": 0}


def test_serve_polls_until_every_study_is_graded(bench_serve):
    svc = _FakeService()
    loop_s, polls = bench_serve.grade_until_done(svc, 3, timeout_s=30, pause_s=0)
    assert polls == 4 and len(svc.rows) == 3 and loop_s > 0


def test_serve_polling_stops_at_the_timeout(bench_serve):
    svc = _FakeService()
    t0 = time.perf_counter()
    loop_s, polls = bench_serve.grade_until_done(svc, 5, timeout_s=0.3, pause_s=0)
    waited = time.perf_counter() - t0
    assert len(svc.rows) == 3 and polls > 4  # two studies never come: it gives up, bounded
    assert 0.3 < waited < 30 and 0 < loop_s < 0.3  # the idle polls after the last grade: not timed


# ------------------------------------------------------------------------------ bench_scale


def _scale_row(new: int, cpu_s: float) -> dict:
    return {"new": new, "cpu_s": cpu_s, "bytes_per_study": 5e6}


def test_scale_preprocess_rate_counts_only_studies_preprocessed_here():
    from bench_scale import preprocess_rate

    # 100 cold studies, then 100 more of which none was cached: 300 CPU s over 200 studies.
    assert preprocess_rate([_scale_row(100, 100.0), _scale_row(100, 200.0)]) == (1.5, 200)
    # A size whose studies were all cached adds neither seconds nor studies.
    assert preprocess_rate([_scale_row(100, 100.0), _scale_row(0, 0.01)]) == (
        pytest.approx(1.0001),
        100,
    )
    assert preprocess_rate([_scale_row(0, 0.01)]) is None  # a warm cache measured nothing


def test_scale_projection_is_labelled_and_refused_on_a_warm_cache():
    from bench_scale import projection_lines

    cold = projection_lines([_scale_row(100, 150.0)], 2e9, 0.5e9, 4)
    assert cold[0].startswith("Projected for the RSNA training set")
    assert all("projected" in line for line in cold[2:])
    assert "1.50 CPU s a study (measured on 100 studies" in cold[2]
    warm = projection_lines([_scale_row(0, 0.01)], 2e9, 0.5e9, 4)
    assert warm[2].startswith("- preprocess: not projected") and "CPU s a study" not in warm[2]


# ------------------------------------------------------------------------------ seeds bench


def _levels(case: str, dists: list[float], wrong: int = 0) -> pd.DataFrame:
    """A case's scored levels; the first ``wrong`` named as their neighbour (misnamed)."""
    from spinegrade.task import LEVELS

    rows = [{"case": case, "level": lv, "dist_mm": d, "found": True,
             "nearest": LEVELS[(i + 1) % 5] if i < wrong else lv}
            for i, (lv, d) in enumerate(zip(LEVELS, dists, strict=True))]  # fmt: skip
    return pd.DataFrame(rows)


def test_seeds_summary_counts_the_levels_scored():
    from bench_real_anatomy_seeds import seed_summary

    a = pd.concat([_levels("a", [1, 2, 3, 8, 20], wrong=1), _levels("b", [0, 0, 0, 0, 0])])
    table, line = seed_summary({42: a, 7: _levels("a", [1, 1, 1, 1, 1])})
    assert table["levels"].tolist() == [10, 5] and table["misnamed"].tolist() == [1, 0]
    assert "misnamed 0.5 of 5-10 levels scored" in line and "190" not in line
    _, same = seed_summary({42: a, 7: a})
    assert "misnamed 1.0 of 10 levels scored" in same


def test_seeds_reuse_scores_only_of_the_same_design(tmp_path, monkeypatch):
    import bench_real_anatomy_seeds as seeds

    base = ["D", "C", str(tmp_path / "out"), "--real", "R", "--seeds", "42"]
    baseline = seeds.parse_args(base)
    design = seeds.parse_args([*base, "--", "localizer.epochs=3"])
    other_config = seeds.parse_args([*base, "--config", "default"])
    homes = {seeds.design_dir(a) for a in (baseline, design, other_config)}
    assert len(homes) == 3 and all(h.parent == tmp_path / "out" for h in homes)
    assert seeds.design_dir(seeds.parse_args(base)) == seeds.design_dir(baseline)  # stable

    calls: list[list[str]] = []

    def fake_run(cmd, **_):
        calls.append(cmd)
        if "--csv" in cmd:  # the scoring step writes the seed's scores
            part = Path(cmd[cmd.index("--csv") + 1])
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_text("case\n")
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(seeds.subprocess, "run", fake_run)
    done = seeds.run_seed(baseline, 42)
    assert done == seeds.design_dir(baseline) / "seed_42" / "real.csv" and len(calls) == 2
    assert seeds.run_seed(baseline, 42) == done and len(calls) == 2  # resumed: not redone
    # The baseline's scores exist, but a design trains and scores its own seed 42.
    new = seeds.run_seed(design, 42)
    assert new != done and len(calls) == 4 and "localizer.epochs=3" in calls[2]


# ------------------------------------------------------------------------------ bench_oof, measure


def test_a_part_of_a_pass_is_timed_inside_it_and_put_back():
    from measure import _time_calls

    def slow(x: int) -> int:
        time.sleep(0.02)
        return x + 1

    module = SimpleNamespace(slow=slow)
    cpu = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    t0 = time.perf_counter()
    with _time_calls(module, "slow", cpu) as spent:
        assert module.slow(1) == 2 and module.slow(2) == 3
        time.sleep(0.02)  # the rest of the pass
    whole = time.perf_counter() - t0
    assert spent[1] == 2 and 0.04 <= spent[0] < whole  # a part of the pass: less than all of it
    assert module.slow is slow


def _oof_report(rate: float) -> dict:
    oof = {"studies": 2, "s_per_study": 3.0, "grade_crops_per_s": rate, "localize_s_per_study": 1.0}
    proj = {"n_val": 395, "oof_s": 1185.0 if math.isfinite(rate) else math.nan,
            "oof_frac_of_training": 0.05, "grader_train_s": 20000.0,
            "localizer_train_s": 3700.0}  # fmt: skip
    return {
        "measured": {"oof_old": {**oof, "s_per_study": 4.0}, "oof_new": oof,
                     "grader_train_crops_per_s": 30.0, "localizer_train_stacks_per_s": 1.5},
        "projected": {"batched": proj},
    }  # fmt: skip


def test_oof_closing_lines_keep_measured_and_projected_apart():
    from bench_oof import closing_lines

    measured, projected = closing_lines(_oof_report(12.5))
    assert measured.startswith("measured: ") and "projected" not in measured
    assert "4.00 s/study one at a time, 3.00 s/study batched (12.5 crops/s" in measured
    assert projected.startswith("projected (from those rates, not run): OOF of a 395-study fold")
    assert "1185 s = 5.0% of the fold's training (23700 s)" in projected


def test_oof_projects_nothing_from_a_rate_not_measured():
    from bench_oof import closing_lines

    lines = closing_lines(_oof_report(float("nan")))
    assert lines[-1] == "projected: none (a rate above was not measured)"
