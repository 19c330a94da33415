"""Prediction: input kinds, the symlink layout, submission order, the fold ensemble end to end.

The end-to-end tests train a tiny run (2 folds, 1 epoch, tiny models) on a few phantom studies
once per module; what they check does not depend on how well it learned.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spinegrade.inference.ensemble import PHANTOM_CAUTION, parse_folds
from spinegrade.inference.inputs import default_work_dir, prepare_input
from spinegrade.inference.predict import missing_series_warning, scrub_paths
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, submission_row_ids
from tiny_config import TINY_RUN

TINY = TINY_RUN
PATIENT_MARKERS = ("PatientName", "PatientID")  # filled in from the phantom's headers below


# ------------------------------------------------------------------------------- unit level


def test_parse_folds_accepts_commas_and_repeats() -> None:
    assert parse_folds(None) is None and parse_folds([]) is None
    assert parse_folds(["0,2", "1"]) == [0, 1, 2]
    with pytest.raises(ValueError, match="not a fold number"):
        parse_folds(["a"])


def test_paths_are_scrubbed_from_messages() -> None:
    text = scrub_paths("cannot read /data/DOE^JOHN/series 1/IM0001: bad header")
    assert "DOE" not in text and "IM0001" in text
    assert "DOE" not in scrub_paths(r"cannot read C:\PACS\DOE^JOHN\1.dcm")
    # A series type with a slash in its name is not a path.
    text = "study 5: no usable Sagittal T2/STIR series"
    assert scrub_paths(text) == text


def test_missing_series_warning_names_the_study() -> None:
    assert missing_series_warning(5, {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}) is None
    text = missing_series_warning(5, {"Sagittal T2/STIR"})
    assert text.startswith("study 5:") and "Axial T2" in text and "20 of its 25" in text


def test_work_dir_never_lies_inside_the_input(tmp_path: Path) -> None:
    inp = tmp_path / "input"
    inp.mkdir()
    outside = default_work_dir(tmp_path / "out" / "sub.csv", inp)
    assert outside.parent == (tmp_path / "out" / ".spinegrade_cache").resolve()
    inside = default_work_dir(inp / "sub.csv", inp)
    assert not inside.resolve().is_relative_to(inp.resolve())
    with pytest.raises(ValueError, match="never writes into its input"):
        prepare_input(inp, inp / "cache")


def test_raw_input_lists_each_study_folder_and_series(tmp_path: Path) -> None:
    from spinegrade.inference.inputs import STUDIES_COLUMNS
    from spinegrade.io.discover import stable_id
    from test_discover import AX_IOP, SAG_IOP, write_series

    raw = tmp_path / "export"
    # Two studies in nested folders; the second one's folder is named after its patient.
    a, b = "1.2.826.0.1.3680043.8.498.11", "1.2.826.0.1.3680043.8.498.22"
    write_series(raw / "ward3" / "case1" / "sag1", a, "SAG T1", SAG_IOP, kind="T1")
    write_series(raw / "ward3" / "case1" / "sag2", a, "SAG T2", SAG_IOP, n=3)
    write_series(raw / "ward3" / "case1" / "ax", a, "", AX_IOP)
    for sub, desc, iop in (("s", "SAG STIR", SAG_IOP), ("t", "AX T2", AX_IOP)):
        write_series(raw / "ward4" / "SMITH^ANN" / sub, b, desc, iop, patient="SMITH^ANN")
    prepared = prepare_input(raw, tmp_path / "work")
    studies = prepared.studies
    assert list(studies.columns) == STUDIES_COLUMNS
    assert sorted(set(studies["study_id"])) == sorted([stable_id(a), stable_id(b)])
    rows_a = studies[studies["study_id"] == stable_id(a)]
    assert set(rows_a["study_folder"]) == {"ward3/case1"}
    got = {
        r.series_folder: (r.series_description, r.type_source, r.guessed, r.n_files)
        for r in rows_a.itertuples()
    }
    assert got == {
        "ward3/case1/sag1": ("Sagittal T1", "description", False, 4),
        "ward3/case1/sag2": ("Sagittal T2/STIR", "description", False, 3),
        "ward3/case1/ax": ("Axial T2", "plane only", True, 4),
    }
    rows_b = studies[studies["study_id"] == stable_id(b)]
    assert set(rows_b["study_folder"]) == {"ward4/[patient]"}
    assert sorted(rows_b["series_folder"]) == ["ward4/[patient]/s", "ward4/[patient]/t"]
    assert "SMITH" not in studies.to_csv() and "DOE" not in studies.to_csv()


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained(tiny_trained) -> tuple[Path, Path]:
    """The session's phantom data (4 train + 3 test studies) and tiny 2-fold run (conftest)."""
    return tiny_trained


def identifiers(data: Path) -> list[str]:
    """The phantom's patient identifiers (name, id, birth date, accession) of the test split."""
    import pydicom

    out: set[str] = set()
    for path in (data / "test_images").rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out |= {str(ds.PatientName), ds.PatientID, ds.PatientBirthDate, ds.AccessionNumber}
    return sorted(v for v in out if v)


def assert_no_identifier(folders: list[Path], secrets: list[str]) -> int:
    """Every regular file (not links into the input) under ``folders`` is free of ``secrets``."""
    needles = [s.encode() for s in secrets] + [s.replace("^", " ").encode() for s in secrets]
    n = 0
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            blob = path.read_bytes()
            found = [s for s in needles if s in blob]
            assert not found, f"{path} contains a patient identifier {found[0]!r}"
            assert not any(s.encode() in str(path).encode() for s in secrets), path
            n += 1
    return n


def _check_submission(sub: pd.DataFrame, study_ids: list[int]) -> None:
    assert sub["row_id"].tolist() == submission_row_ids(study_ids)
    probs = sub[list(PROB_COLUMNS)].to_numpy()
    assert np.isfinite(probs).all() and (probs >= 0).all()
    assert np.allclose(probs.sum(axis=1), 1.0)


def test_rsna_input_gives_the_competition_rows_and_reports(trained, tmp_path: Path) -> None:
    from spinegrade.inference.predict import predict

    data, run = trained
    out = tmp_path / "out"
    result = predict(run, data, out / "submission.csv", report_dir=out / "report", progress=False)
    sub = pd.read_csv(out / "submission.csv")
    sample = pd.read_csv(data / "sample_submission.csv")
    assert sub["row_id"].tolist() == sample["row_id"].tolist()  # exactly the competition's rows
    test_ids = sorted(pd.read_csv(data / "test_series_descriptions.csv")["study_id"].unique())
    _check_submission(sub, test_ids)
    assert result.input_kind == "rsna" and result.folds == [0, 1]
    assert result.work_dir.is_relative_to(out.resolve())  # the cache sits beside the output
    for sid in test_ids:
        folder = out / "report" / str(sid)
        assert {p.name for p in folder.iterdir()} == {"figure.png", "thumb.png", "grades.json"}
        grades = json.loads((folder / "grades.json").read_text())
        assert list(grades["targets"]) == list(LABEL_COLUMNS)
        located = [t for t in grades["targets"].values() if t["point_lps_mm"] is not None]
        assert len(located) >= 15  # sagittal points always exist with all series present
        # The series each type was read from, among the study's own series.
        own = set(pd.read_csv(data / "test_series_descriptions.csv").query("study_id == @sid")[
            "series_id"])  # fmt: skip
        assert {int(v) for ids in grades["series"].values() for v in ids} <= own
        assert {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"} == set(grades["series"])
        assert grades["model"]["init"]["model"] == [{"source": "random"}]
        # Trained on `spinegrade synth` data: every study's grades carry the caution.
        assert grades["model"]["training_data"] == {"grader": ["phantom"], "localizer": ["phantom"]}
        assert grades["model"]["notes"] == [PHANTOM_CAUTION]
    assert result.model_notes == [PHANTOM_CAUTION]
    html = (out / "report" / "index.html").read_text()
    assert f"<p class='caution'>{PHANTOM_CAUTION}</p>" in html
    assert all(f'src="{sid}/thumb.png"' in html for sid in test_ids)
    assert "series used: Sagittal T1" in html and "model backbone: random initialisation" in html
    # studies.csv: every study id -> test_images/<id> and the series of the CSV.
    studies = pd.read_csv(out / "studies.csv")
    assert result.studies_path == out / "studies.csv"
    described = pd.read_csv(data / "test_series_descriptions.csv")
    assert sorted(zip(studies["series_id"], studies["series_description"], strict=True)) == sorted(
        zip(described["series_id"], described["series_description"], strict=True)
    )
    assert (studies["study_folder"] == "test_images/" + studies["study_id"].astype(str)).all()
    assert (studies["type_source"] == "csv").all() and (studies["n_files"] > 0).all()
    assert all(f'<td class="folder">test_images/{sid}</td>' in html for sid in test_ids)
    n = assert_no_identifier([out], identifiers(data))
    assert n > 3 * len(test_ids)


def test_raw_folder_is_discovered_typed_and_left_untouched(trained, tmp_path: Path) -> None:
    import pydicom

    from spinegrade.inference.predict import predict
    from spinegrade.io.discover import stable_id

    data, run = trained
    # A hospital-style export: no CSV, folders named after the patient, files renamed and mixed.
    # Each study lies in its own nested case folder, under a folder named after the patient.
    raw = tmp_path / "export"
    truth: dict[int, str] = {}
    folder_of: dict[int, str] = {}
    described = pd.read_csv(data / "test_series_descriptions.csv")
    cases = {sid: j for j, sid in enumerate(sorted(described["study_id"].unique()))}
    for k, path in enumerate(sorted((data / "test_images").rglob("*.dcm"))):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        case = f"ward/case{cases[int(path.parent.parent.name)]}"
        dst = raw / case / str(ds.PatientName) / f"exam{k % 2}" / f"IM{k:05d}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst)
        desc = described.loc[described["series_id"] == int(path.parent.name), "series_description"]
        truth[stable_id(ds.SeriesInstanceUID)] = desc.iloc[0]
        folder_of[stable_id(ds.StudyInstanceUID)] = f"{case}/[patient]"
    before = sorted((p, p.stat().st_mtime_ns) for p in raw.rglob("*"))
    out = tmp_path / "out"
    result = predict(run, raw, out / "sub.csv", report_dir=out / "report", progress=False)
    assert result.input_kind == "raw"
    assert sorted((p, p.stat().st_mtime_ns) for p in raw.rglob("*")) == before
    typed = pd.read_csv(result.work_dir / "layout" / "test_series_descriptions.csv")
    assert dict(zip(typed["series_id"], typed["series_description"], strict=True)) == truth
    _check_submission(pd.read_csv(out / "sub.csv"), sorted(set(typed["study_id"])))
    # studies.csv maps each hashed id to its folder (the patient's name blanked) and its series.
    studies = pd.read_csv(out / "studies.csv")
    assert dict(zip(studies["study_id"], studies["study_folder"], strict=False)) == folder_of
    assert dict(zip(studies["series_id"], studies["series_description"], strict=True)) == truth
    assert studies["n_files"].sum() == len(list(raw.rglob("IM*")))
    html = (out / "report" / "index.html").read_text()
    assert "<th>Input folder</th>" in html
    assert all(f'<td class="folder">{f}</td>' in html for f in folder_of.values())
    assert_no_identifier([out], identifiers(data))


def test_a_study_missing_a_series_still_gets_its_rows(trained, tmp_path: Path, caplog) -> None:
    from spinegrade.inference.predict import predict

    data, run = trained
    layout = tmp_path / "rsna"
    shutil.copytree(data / "test_images", layout / "test_images")
    series = pd.read_csv(data / "test_series_descriptions.csv")
    series.to_csv(layout / "test_series_descriptions.csv", index=False)
    victim = series[series["series_description"] == "Sagittal T1"].iloc[0]
    shutil.rmtree(layout / "test_images" / str(victim.study_id) / str(victim.series_id))
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        result = predict(run, layout, out / "sub.csv", report_dir=out / "r", progress=False)
    _check_submission(pd.read_csv(out / "sub.csv"), sorted(series["study_id"].unique()))
    warnings = " ".join(result.warnings[int(victim.study_id)])
    assert "no usable Sagittal T1" in warnings and f"study {victim.study_id}" in caplog.text
    grades = json.loads((out / "r" / str(victim.study_id) / "grades.json").read_text())
    foraminal = [t for c, t in grades["targets"].items() if "foraminal" in c]
    assert all(t["source"] == "prior" for t in foraminal)
    # The views it has are still read: the sagittal T2 localiser placed the five canal points.
    spinal = [t for c, t in grades["targets"].items() if c.startswith("spinal")]
    assert all(t["point_lps_mm"] is not None for t in spinal)


def test_cli_predict_with_a_fold_subset(trained, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from spinegrade.cli import app

    data, run = trained
    out = tmp_path / "sub.csv"
    args = ["predict", str(run), str(data), "--out", str(out), "--folds", "1", "--no-progress"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "folds [1]" in res.output and out.is_file()
    assert f"caution: {PHANTOM_CAUTION}" in res.output  # the run learned from a phantom only
    bad = CliRunner().invoke(app, [*args[:-3], "--folds", "7"])
    assert bad.exit_code == 2 and "not trained" in bad.output


def test_one_failing_study_gets_the_prior_and_the_batch_goes_on(
    trained, tmp_path: Path, monkeypatch
) -> None:
    from spinegrade.inference.ensemble import Predictor
    from spinegrade.inference.predict import predict

    data, run = trained
    test_ids = sorted(pd.read_csv(data / "test_series_descriptions.csv")["study_id"].unique())
    original = Predictor.predict_many
    bad = test_ids[0]  # a study whose images make the models fail, in the batch of all three

    def flaky(self, studies, *args, **kwargs):
        if bad in studies:
            raise RuntimeError("simulated failure")
        return original(self, studies, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_many", flaky)
    result = predict(run, data, tmp_path / "sub.csv", cache_dir=tmp_path / "w", progress=False)
    _check_submission(pd.read_csv(tmp_path / "sub.csv"), test_ids)
    assert "simulated failure" in " ".join(result.warnings[bad])
    # The batch failed as a whole; its other studies were graded one by one.
    graded = dict(zip(result.study_ids, result.graded_per_study, strict=True))
    assert graded[bad] == 0 and all(graded[s] > 0 for s in test_ids[1:])
    assert not any("failed" in w for s in test_ids[1:] for w in result.warnings[s])


def test_all_prior_is_an_error_and_strict_refuses_any_fallback(
    trained, tmp_path: Path, monkeypatch
) -> None:
    from dataclasses import replace

    from typer.testing import CliRunner

    from spinegrade.cli import app
    from spinegrade.inference.ensemble import Predictor

    data, run = trained
    original = Predictor.predict_many
    args = ["predict", str(run), str(data), "--cache", str(tmp_path / "w"), "--no-progress"]

    def one_prior(self, studies, *a, **kw):  # every study: one target left to the prior
        out = {}
        for sid, pred in original(self, studies, *a, **kw).items():
            graded = pred.graded.copy()
            graded[0] = False
            out[sid] = replace(pred, graded=graded)
        return out

    monkeypatch.setattr(Predictor, "predict_many", one_prior)
    ok = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.csv")])
    assert ok.exit_code == 0, ok.output
    assert "model backbone: random initialisation" in ok.output
    strict = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.csv"), "--strict"])
    n_test = len(pd.read_csv(data / "test_series_descriptions.csv")["study_id"].unique())
    assert strict.exit_code == 2 and f"--strict: {n_test} of {n_test} studies" in strict.output
    monkeypatch.setattr(
        Predictor,
        "predict_many",
        lambda self, studies: {s: self.prior_prediction() for s in studies},
    )
    none = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "c.csv")])
    assert (
        none.exit_code == 2
        and f"every study ({n_test}) fell back to the training prior" in none.output
    )
    assert (tmp_path / "c.csv").is_file()  # written, for inspection


def _in_worker_noting_pid(sids: list[int], run: tuple, job) -> list:
    """``predict._predict_in_worker`` that first leaves a file named after its process and each
    study of its batch beside the reports. Runs in the worker (pickled by name: this module is
    importable there)."""
    import spinegrade.inference.predict as predict

    pids = Path(job.report_dir).parent / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    for sid in sids:
        (pids / f"{os.getpid()}-{sid}").touch()
    return predict._predict_in_worker(sids, run, job)


def test_worker_processes_predict_what_one_process_does(
    trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two single-threaded processes, a batch of studies each at a time (the CLI's --workers): the
    # same submission, reports and per-study records as one process, in the same study order.
    import spinegrade.inference.predict
    from spinegrade.inference.predict import predict

    data, run = trained
    one = predict(run, data, tmp_path / "one" / "sub.csv", report_dir=tmp_path / "one" / "r",
                  cache_dir=tmp_path / "w1", progress=False)  # fmt: skip
    # The pool looks the worker function up in the module when it submits the studies.
    monkeypatch.setattr(spinegrade.inference.predict, "_predict_in_worker", _in_worker_noting_pid)
    two = predict(run, data, tmp_path / "two" / "sub.csv", report_dir=tmp_path / "two" / "r",
                  cache_dir=tmp_path / "w2", workers=2, progress=False)  # fmt: skip
    # Each study was predicted once, in a worker process, and both workers took a share (the
    # second is up long before the first has loaded the models and finished its study).
    pid_dir = tmp_path / "two" / "pids"  # absent: no study went to a worker
    noted = [name.split("-") for name in os.listdir(pid_dir)] if pid_dir.is_dir() else []
    assert sorted(int(sid) for _, sid in noted) == sorted(two.study_ids) and len(noted) == 3
    pids = {int(pid) for pid, _ in noted}
    assert len(pids) == 2 and os.getpid() not in pids, noted
    a, b = pd.read_csv(tmp_path / "one" / "sub.csv"), pd.read_csv(tmp_path / "two" / "sub.csv")
    assert a["row_id"].tolist() == b["row_id"].tolist()
    # Same weights and inputs; one thread instead of two may reorder float sums.
    assert np.allclose(a[list(PROB_COLUMNS)], b[list(PROB_COLUMNS)], atol=1e-5)
    assert one.graded_per_study == two.graded_per_study and len(two.per_study_s) == 3
    assert one.warnings == two.warnings
    for sid in one.study_ids:
        grades = [json.loads((tmp_path / k / "r" / str(sid) / "grades.json").read_text())
                  for k in ("one", "two")]  # fmt: skip
        assert grades[0]["targets"].keys() == grades[1]["targets"].keys()
        for t in grades[0]["targets"]:
            p0, p1 = (
                grades[0]["targets"][t]["point_lps_mm"],
                grades[1]["targets"][t]["point_lps_mm"],
            )
            assert (p0 is None) == (p1 is None)
            assert p0 is None or np.allclose(p0, p1, atol=1e-3)
    assert (tmp_path / "two" / "r" / "index.html").is_file()


def test_folds_side_by_side_predict_what_folds_in_turn_do(
    trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CPU with two torch threads the folds of one study run on two threads, one torch thread
    # each; with one torch thread they run in turn. Same numbers, and the thread count is back.
    import torch

    import spinegrade.inference.fold_models as inference
    from spinegrade.data.studies import load_studies
    from spinegrade.inference.ensemble import Predictor, fold_map

    _, run = trained
    predictor = Predictor.from_run_dir(run, device="cpu", engine="torch")
    cache = run.parent / "cache"
    sid = int(pd.read_csv(cache / "index.csv").query("split == 'train'")["study_id"].iloc[0])
    stacks = load_studies(cache, [sid], progress=False)[sid].stacks
    assert len(predictor.models) == 2
    # Where each fold's grading ran: its thread and torch's thread count there. With both folds
    # side by side, each waits at the barrier for the other, which only a concurrent fold passes.
    ran: list[tuple[int, int]] = []
    together = threading.Barrier(2)

    def graded(*args, meet: bool = False, **kwargs):
        ran.append((threading.get_ident(), torch.get_num_threads()))
        if meet:
            together.wait(timeout=20)  # a fold run alone breaks the barrier: an error
        return grade_studies(*args, **kwargs)

    grade_studies = inference.grade_studies  # predict looks it up there on every call
    before = torch.get_num_threads()
    seen: list[int] = []
    try:
        torch.set_num_threads(1)
        with fold_map("cpu", 2) as each:
            assert each is map
        monkeypatch.setattr(inference, "grade_studies", graded)
        in_turn = predictor.predict(stacks)
        assert ran == [(threading.get_ident(), 1)] * 2  # one after the other, in this thread
        torch.set_num_threads(2)
        with fold_map("cpu", 2) as each:
            assert each is not map
            list(each(lambda _: seen.append(torch.get_num_threads()), range(2)))
        assert seen == [1, 1] and torch.get_num_threads() == 2
        ran.clear()
        monkeypatch.setattr(inference, "grade_studies", functools.partial(graded, meet=True))
        side_by_side = predictor.predict(stacks)
        # Two pool threads, at the same time, one torch thread each.
        assert len({t for t, _ in ran}) == 2 and threading.get_ident() not in dict(ran), ran
        assert [n for _, n in ran] == [1, 1]
        assert torch.get_num_threads() == 2
        # More threads than folds: the threads are shared out among the folds.
        torch.set_num_threads(6)
        for folds, inside in ((2, 3), (5, 1), (4, 1)):
            seen.clear()
            with fold_map("cpu", folds) as each:
                list(each(lambda _: seen.append(torch.get_num_threads()), range(folds)))
            assert seen == [inside] * folds and torch.get_num_threads() == 6
        with fold_map("cuda", 5) as each:
            assert each is map
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(in_turn.graded, side_by_side.graded)
    assert np.allclose(in_turn.probs, side_by_side.probs, atol=1e-6)
    assert np.allclose(in_turn.points, side_by_side.points, atol=1e-6, equal_nan=True)


def test_only_phantom_trained_runs_carry_the_caution(trained, tmp_path: Path) -> None:
    # The fold records what each network learned from (metrics.json); a run trained on real
    # images, or an older run that did not record it, predicts without the phantom caution.
    import shutil
    from types import SimpleNamespace

    from spinegrade.inference.ensemble import LOCALIZER_CAUTION, Predictor, grader_caution
    from spinegrade.inference.fold_models import learned_from, load_fold_models
    from spinegrade.rsna import is_phantom

    data, run = trained
    assert is_phantom(data) and not is_phantom(tmp_path)
    (tmp_path / "truth").mkdir()
    (tmp_path / "truth" / "phantom.json").write_text('{"generator": "someone else"}')
    assert not is_phantom(tmp_path)
    metrics = json.loads((run / "fold_0" / "metrics.json").read_text())
    assert metrics["sources"]["phantom"]["kind"] == "phantom"
    assert set(metrics["training_data"]) == {"localizer_spinal", "localizer_foraminal",
                                             "grader_spinal", "grader_foraminal",
                                             "grader_subarticular"}  # fmt: skip
    assert load_fold_models(run / "fold_0").training_data == {
        "localizer": ["phantom"],
        "grader": ["phantom"],
    }
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = copy / "fold_0" / "metrics.json"
    old = json.loads(path.read_text())
    del old["training_data"]
    path.write_text(json.dumps(old))
    assert load_fold_models(copy / "fold_0").training_data == {}
    # Folds from before several sources recorded one word for the whole fold.
    assert learned_from({"training_data": "phantom"}) == {"localizer": ["phantom"],
                                                          "grader": ["phantom"]}  # fmt: skip
    assert learned_from({"training_data": "images"}) == {"localizer": ["real"], "grader": ["real"]}

    def caution(*kinds: dict) -> list[str]:
        models = [SimpleNamespace(training_data=k, net_data={}) for k in kinds]
        return Predictor(run, list(range(len(kinds))), models, "cpu").describe_training()

    phantom = {"localizer": ["phantom"], "grader": ["phantom"]}
    real = {"localizer": ["real"], "grader": ["real"]}
    mixed = {"localizer": ["phantom", "real"], "grader": ["phantom"]}
    assert caution(phantom, phantom) == [PHANTOM_CAUTION]
    assert caution(real, real) == [] and caution({}, {}) == []
    assert caution(real, phantom) == [PHANTOM_CAUTION]  # any fold that saw only phantoms
    assert caution({"localizer": ["phantom"]}) == [PHANTOM_CAUTION]  # a localiser-only run
    # The demo: levels learned from phantoms and real spines, grades from phantoms only.
    assert caution(mixed, mixed) == [grader_caution(["phantom", "real"])]
    assert "real spines" in caution(mixed)[0] and "grades are not validated" in caution(mixed)[0]
    assert caution({"localizer": ["phantom"], "grader": ["real"]}) == [LOCALIZER_CAUTION]
    # A localiser net that saw phantoms only beside one that saw real spines is named.
    demo = SimpleNamespace(
        training_data=mixed,
        net_data={"localizer_spinal": ["phantom", "real"], "localizer_foraminal": ["phantom"]},
    )
    notes = Predictor(run, [0], [demo], "cpu").describe_training()
    assert notes == [grader_caution(["phantom", "real"], ["Sagittal T1"])]
    assert "(its Sagittal T1 net on phantoms only)" in notes[0]


def test_batched_prediction_equals_study_by_study(trained) -> None:
    # predict_many localises and grades several studies in shared network passes (looks and
    # crops of all of them in one batch); each study's result is what predicting it alone gives,
    # up to float rounding (a batch changes only how a convolution sums, ~1e-7).
    from spinegrade.data.studies import load_studies
    from spinegrade.inference.ensemble import Predictor

    _, run = trained
    predictor = Predictor.from_run_dir(run, device="cpu")
    cache = run.parent / "cache"
    ids = sorted(int(s) for s in pd.read_csv(cache / "index.csv")["study_id"].unique())[:4]
    loaded = load_studies(cache, ids, progress=False)
    studies = {sid: loaded[sid].stacks for sid in ids}
    studies[-1] = {}  # a study with no usable series rides along: the prior, no points
    together = predictor.predict_many(studies)
    assert list(together) == [*ids, -1]
    for sid in ids:
        alone = predictor.predict(studies[sid])
        assert alone.graded.any() and np.array_equal(alone.graded, together[sid].graded)
        assert np.abs(alone.probs - together[sid].probs).max() <= 1e-6
        assert np.allclose(alone.points, together[sid].points, atol=1e-4, equal_nan=True)
    prior = predictor.prior_prediction()
    assert not together[-1].graded.any() and np.isnan(together[-1].points).all()
    assert np.allclose(together[-1].probs, prior.probs)
