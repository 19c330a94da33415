"""`spinegrade import spider`: a SPIDER-like folder (or tarball) -> an RSNA training folder.

The tests build their own tiny SPIDER T2-SPACE look-alike (three cases of three sagittal slices,
real DICOM with SPIDER's orientation, points placed in millimetres) so they never need the real
set; the importer must copy the DICOM bytes untouched, re-key the points to RSNA ids and put them
where training reads them back (through the preprocessing cache) at the source's millimetres.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from typer.testing import CliRunner

from dicom_factory import mr_dataset, save
from spinegrade.cli import app
from spinegrade.localization.points import true_points
from spinegrade.preprocessing.build import preprocess_dataset
from spinegrade.preprocessing.cache import load_study_stacks, read_index
from spinegrade.rsna import (
    DISC_COORDINATE_COLUMNS,
    load_dataset,
    load_disc_coordinates,
    normalize_coordinates,
)
from spinegrade.rsna import spider as spider_mod
from spinegrade.rsna.spider import (
    ID_BASE,
    SERIES_OFFSET,
    SpiderFormatError,
    SpiderImport,
    SpiderSourceError,
    import_spider,
)
from spinegrade.task import (
    LABEL_COLUMNS,
    LEVEL_TITLES,
    SAG_T2,
    SPIDER_DISCS,
    TITLE_TO_LEVEL,
    dataset_task,
)

PATIENTS = (5, 7, 118)
N_SLICES, SHAPE, SPACING, STEP = 3, (40, 32), 0.9375, 4.0  # SPIDER's grid, smaller images
# SPIDER's ImageOrientationPatient: columns run anterior -> posterior, rows head -> feet.
ROW_DIR, COL_DIR = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
LEVELS_BOTTOM_UP = tuple(reversed(LEVEL_TITLES.values()))  # the source lists L5/S1 first
POINT_COLUMNS = ["case_id", "level", "x_mm", "y_mm", "z_mm", "instance_number", "x", "y"]
DISC_NAME = "train_disc_coordinates.csv"
VENDOR_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "vendor_spider.py"


def slice_origin(j: int) -> np.ndarray:
    """ImagePositionPatient of slice j: x grows 4 mm a slice, the image centre at y = z = 0."""
    h, w = SHAPE
    return np.array(
        [(j - (N_SLICES - 1) / 2) * STEP, -(w - 1) / 2 * SPACING, (h - 1) / 2 * SPACING]
    )


def write_spider(root: Path, seed: int = 0) -> Path:
    """A SPIDER T2-SPACE look-alike: series/, masks/, truth/canal/cases/gradings/excluded CSVs."""
    rng = np.random.default_rng(seed)
    h, w = SHAPE
    cases, truth, canal, gradings = [], [], [], []
    for patient in PATIENTS:
        case = f"spider_{patient}"
        for j in range(N_SLICES):
            # Multiples of 8 and some not: the vendor script's rounding must show.
            pixels = rng.integers(0, 2041, size=SHAPE).astype(np.uint16)
            ds = mr_dataset(
                pixels, position=slice_origin(j), row=ROW_DIR, col=COL_DIR,
                pixel_spacing=(SPACING, SPACING), instance=j + 1, description=SAG_T2,
                series_uid=f"1.2.826.0.1.{patient}", thickness=STEP, spacing_between=STEP,
            )  # fmt: skip
            ds.PatientID = f"SPIDER{patient}"
            save(ds, root / "series" / case / f"{j + 1}.dcm")
            mask = root / "masks" / case / f"{j + 1}.png"
            mask.parent.mkdir(parents=True, exist_ok=True)
            _png(rng.integers(0, 4, size=SHAPE).astype(np.uint8), mask)
        for k, level in enumerate(LEVELS_BOTTOM_UP):
            for table in (truth, canal):
                instance = int(rng.integers(1, N_SLICES + 1))
                x = round(float(rng.uniform(2, w - 3)), 2)
                y = round(float(rng.uniform(2, h - 3)), 2)
                mm = slice_origin(instance - 1) + x * SPACING * ROW_DIR + y * SPACING * COL_DIR
                mm[0] += rng.uniform(-1.9, 1.9)  # a centroid between slices, as in the real set
                table.append([case, level, *np.round(mm, 2), instance, x, y])
            gradings.append([case, level, k + 1, int(rng.integers(1, 6)), 0, 1, k % 2, 0, 0])
        gradings.append([case, "T12/L1", 6, 2, 0, 0, 1, 1, 1])  # thoracic discs are graded too
        cases.append([case, patient, f"{patient}_t2_SPACE", "training", N_SLICES, ""])
    cases[-1][3] = "validation"
    cases[0][5] = "disc masks change every 2nd slice, a note with a comma"
    frames = {
        "truth.csv": pd.DataFrame(truth, columns=POINT_COLUMNS),
        "canal.csv": pd.DataFrame(canal, columns=POINT_COLUMNS),
        "cases.csv": pd.DataFrame(
            cases,
            columns=[
                "case_id",
                "source_patient",
                "spider_series",
                "subset",
                "output_slices",
                "notes",
            ],
        ),
        "gradings.csv": pd.DataFrame(
            gradings,
            columns=[
                "case_id",
                "level",
                "spider_ivd_label",
                "pfirrmann",
                "modic",
                "disc_bulging",
                "disc_narrowing",
                "disc_herniation",
                "spondylolisthesis",
            ],
        ),
        "excluded.csv": pd.DataFrame(
            [[50, "50_t2_SPACE", "distorted anatomy"]],
            columns=["source_patient", "spider_series", "reason"],
        ),
    }
    for name, frame in frames.items():
        frame.to_csv(root / name, index=False, float_format="%.2f")
    return root


def _png(pixels: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(pixels, mode="L").save(path)


def make_tarball(folder: Path, path: Path, top: str | None = None) -> Path:
    """``folder``'s layout in a .tar.xz, at its root or under one ``top`` folder."""
    with tarfile.open(path, "w:xz") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name if top is None else f"{top}/{child.name}")
    return path


def csv_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.csv"))}


@pytest.fixture
def spider(tmp_path: Path) -> Path:
    return write_spider(tmp_path / "spider")


@pytest.fixture(autouse=True)
def _quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")


# ------------------------------------------------------------------------------ the output
def test_import_writes_an_rsna_training_folder(spider: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = import_spider(spider, out, progress=False)
    assert summary == SpiderImport(
        out, 3, 15, 15, 9, summary.fingerprint, skipped=False, label_maps=9
    )
    ids = [ID_BASE + p for p in PATIENTS]

    data = load_dataset(out)  # every cross-check of the RSNA loader passes
    assert data.study_ids == ids
    # SPIDER's lumbar gradings as the spider_discs task; no RSNA grades, none invented.
    assert dataset_task(out) == SPIDER_DISCS
    assert not set(LABEL_COLUMNS) & set(data.labels.columns)
    source = pd.read_csv(spider / "gradings.csv")
    for row in source[source["level"] != "T12/L1"].itertuples():
        study = data.labels.set_index("study_id").loc[ID_BASE + int(row.case_id[7:])]
        level = row.level.lower().replace("/", "_")
        assert study[f"pfirrmann_{level}"] == str(row.pfirrmann)
        assert study[f"disc_bulging_{level}"] == ("absent", "present")[row.disc_bulging]
        assert study[f"disc_narrowing_{level}"] == ("absent", "present")[row.disc_narrowing]
        assert study[f"disc_herniation_{level}"] == "absent"
    assert data.series.values.tolist() == [[s, s + SERIES_OFFSET, SAG_T2] for s in ids]
    coords = data.coordinates
    assert set(coords["condition"]) == {"Spinal Canal Stenosis"} and len(coords) == 15
    for sid, rows in coords.groupby("study_id"):  # one series, levels top down
        assert rows["level"].tolist() == list(LEVEL_TITLES.values())
        assert set(rows["series_id"]) == {sid + SERIES_OFFSET}

    canal = pd.read_csv(spider / "canal.csv")
    truth = pd.read_csv(spider / "truth.csv")
    for table, source in ((coords, canal), (load_disc_coordinates(out / DISC_NAME), truth)):
        back = source.assign(study_id=ID_BASE + source["case_id"].str[7:].astype(int))
        merged = table.merge(back, on=["study_id", "level"], suffixes=("", "_src"))
        assert len(merged) == 15
        assert (merged["instance_number"] == merged["instance_number_src"]).all()
        assert np.array_equal(merged[["x", "y"]], merged[["x_src", "y_src"]])
    assert list(pd.read_csv(out / DISC_NAME).columns) == list(DISC_COORDINATE_COLUMNS)

    for patient in PATIENTS:  # the DICOM files, byte for byte, under RSNA ids
        sid = ID_BASE + patient
        for src in (spider / "series" / f"spider_{patient}").glob("*.dcm"):
            copy = out / "train_images" / str(sid) / str(sid + SERIES_OFFSET) / src.name
            assert copy.read_bytes() == src.read_bytes()
    assert len(list((out / "train_images").glob("*/*/*.dcm"))) == 9
    for patient in PATIENTS:  # the label maps too, beside their slices
        sid = ID_BASE + patient
        for src in (spider / "masks" / f"spider_{patient}").glob("*.png"):
            copy = out / "train_label_maps" / str(sid) / str(sid + SERIES_OFFSET) / src.name
            assert copy.read_bytes() == src.read_bytes()
    assert json.loads((out / "label_maps.json").read_text())["classes"] == {
        "0": "background", "1": "disc", "2": "vertebra", "3": "spinal canal"
    }  # fmt: skip

    cases = pd.read_csv(out / "cases.csv")
    assert cases.columns.tolist() == ["study_id", "case_id", "patient_id", "source", "subset"]
    assert cases["study_id"].tolist() == ids
    assert cases["patient_id"].tolist() == [f"SPIDER{p}" for p in PATIENTS]
    assert cases["subset"].tolist() == ["training", "training", "validation"]
    assert set(cases["source"]) == {"spider-t2space"}

    gradings = pd.read_csv(out / "gradings.csv")
    source_gradings = pd.read_csv(spider / "gradings.csv")
    assert gradings.columns.tolist() == ["study_id", *source_gradings.columns]
    assert len(gradings) == 18 and (gradings["level"] == "T12/L1").sum() == 3
    assert gradings.drop(columns="study_id").equals(source_gradings)

    notes = (out / "SOURCE.md").read_text()
    for needed in ("10.1038/s41597-024-03090-w", "10.5281/zenodo.10159290", "CC BY 4.0"):
        assert needed in notes
    assert "creativecommons.org/licenses/by/4.0" in notes
    assert not list(tmp_path.glob("out.partial-*"))


def test_points_land_on_the_source_millimetres_through_the_cache(
    spider: Path, tmp_path: Path
) -> None:
    """The canal rows, read back as training does (cache + true_points), give canal.csv's mm."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    import_spider(spider, out, progress=False)
    summary = preprocess_dataset(out, cache, size=64, progress=False)
    assert summary.n_stacks == 3 and not summary.failures
    # The reader orders slices along the normal (-x here), against InstanceNumber: a mapping by
    # slice position instead of by instance would put points on the wrong slice.
    data, index = load_dataset(out), read_index(cache)
    canal = pd.read_csv(spider / "canal.csv")
    truth = pd.read_csv(spider / "truth.csv")
    discs = load_disc_coordinates(out / DISC_NAME)
    checked = 0
    for patient in PATIENTS:
        sid = ID_BASE + patient
        stacks = load_study_stacks(cache, sid, index=index)
        rows = normalize_coordinates(data.coordinates[data.coordinates["study_id"] == sid])
        points = true_points(rows, stacks)
        for row in canal[canal["case_id"] == f"spider_{patient}"].itertuples():
            got = points.get("spinal_canal_stenosis", TITLE_TO_LEVEL[row.level])
            want = np.array([row.x_mm, row.y_mm, row.z_mm])
            assert np.abs(got - want)[1:].max() < 0.02  # in the sagittal plane: exact
            assert abs(got[0] - want[0]) < STEP / 2  # across: on the nearest slice
            checked += 1
        for row in discs[discs["study_id"] == sid].itertuples():
            (stack,) = stacks
            got = stack.label_to_patient(row.instance_number, row.x, row.y)
            src = truth[(truth["case_id"] == f"spider_{patient}") & (truth["level"] == row.level)]
            want = src[["x_mm", "y_mm", "z_mm"]].to_numpy()[0]
            assert np.abs(got - want)[1:].max() < 0.02 and abs(got[0] - want[0]) < STEP / 2
            checked += 1
    assert checked == 30


def test_a_tarball_imports_as_the_folder_does(spider: Path, tmp_path: Path) -> None:
    folder = import_spider(spider, tmp_path / "a", progress=False)
    tarball = make_tarball(spider, tmp_path / "spider.tar.xz")
    packed = import_spider(tarball, tmp_path / "b", progress=False)
    assert packed.fingerprint == folder.fingerprint and packed.studies == 3
    assert csv_bytes(tmp_path / "b") == csv_bytes(tmp_path / "a")
    a_files = sorted((tmp_path / "a" / "train_images").rglob("*.dcm"))
    b_files = sorted((tmp_path / "b" / "train_images").rglob("*.dcm"))
    assert [p.read_bytes() for p in a_files] == [p.read_bytes() for p in b_files]
    # One wrapping folder (tar made from the parent) is fine too.
    wrapped = make_tarball(spider, tmp_path / "wrapped.tar.xz", top="spider-t2space")
    assert import_spider(wrapped, tmp_path / "c", progress=False).fingerprint == folder.fingerprint


def test_a_tarball_member_outside_the_folder_is_refused(spider: Path, tmp_path: Path) -> None:
    tarball = make_tarball(spider, tmp_path / "evil.tar.xz")
    with tarfile.open(tarball, "r:xz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar]
    with tarfile.open(tarball, "w:xz") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
        evil = tarfile.TarInfo("../escaped.txt")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    with pytest.raises(SpiderSourceError, match=r"'\.\./escaped\.txt'"):
        import_spider(tarball, tmp_path / "out", progress=False)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ robustness
def test_a_second_import_skips_and_other_folders_are_refused(spider: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = import_spider(spider, out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = import_spider(spider, out, progress=False)
    assert again.skipped and again.studies == first.studies and again.files == first.files
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # not one file rewritten

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"{foreign} already exists"):
        import_spider(spider, foreign, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine" and len(list(foreign.iterdir())) == 1

    with pytest.raises(ValueError, match="--id-base"):
        import_spider(spider, out, id_base=ID_BASE + 1000, progress=False)
    canal = spider / "canal.csv"
    canal.write_text(canal.read_text() + "\n")  # same points, other bytes: another source
    with pytest.raises(ValueError, match="not an import of this source"):
        import_spider(spider, out, progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()  # made beforehand by the user: taken over
    assert not import_spider(spider, empty, progress=False).skipped
    next((empty / "train_images").rglob("*.dcm")).unlink()
    with pytest.raises(ValueError, match="holds 8 of its 9 DICOM files"):
        import_spider(spider, empty, progress=False)


def test_an_interrupted_import_leaves_no_dataset(
    spider: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    stale = tmp_path / "out.partial-999999999"  # a killed import's folder (no such pid)
    stale.mkdir()
    copied = []
    real_copy = spider_mod.shutil.copyfile

    def copy_then_die(a: Path, b: Path) -> Path:
        if len(copied) == 4:
            raise KeyboardInterrupt  # Ctrl-C half way through the studies
        copied.append(a)
        return real_copy(a, b)

    monkeypatch.setattr(spider_mod.shutil, "copyfile", copy_then_die)
    with pytest.raises(KeyboardInterrupt):
        import_spider(spider, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob("out.partial-*"))
    monkeypatch.setattr(spider_mod.shutil, "copyfile", real_copy)
    assert import_spider(spider, out, progress=False).files == 9


def test_a_missing_canal_column_names_the_file_and_the_column(spider: Path, tmp_path: Path) -> None:
    canal = spider / "canal.csv"
    pd.read_csv(canal).drop(columns="x").to_csv(canal, index=False)
    with pytest.raises(SpiderFormatError) as err:
        import_spider(spider, tmp_path / "out", progress=False)
    message = str(err.value)
    assert str(canal) in message and "missing columns ['x']" in message
    assert "SPIDER T2-SPACE CSV" in message and not (tmp_path / "out").exists()
    # Inside a tarball the message names the tarball and the member, not a temporary folder.
    tarball = make_tarball(spider, tmp_path / "spider.tar.xz")
    with pytest.raises(SpiderFormatError, match=f"{tarball}:canal.csv"):
        import_spider(tarball, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    "breakage, error, named",
    [
        ("a canal row's instance file is missing", SpiderFormatError, "series/spider_7/"),
        ("a case folder holds no DICOM", SpiderSourceError, "series/spider_118"),
        ("a file is not DICOM", SpiderSourceError, "series/spider_5/1.dcm"),
        ("gradings.csv is missing", FileNotFoundError, "gradings.csv"),
        ("a canal point lies off its image", SpiderFormatError, "outside the 32 x 40 image"),
        ("a label map holds a value no class has", SpiderSourceError, "masks/spider_7/2.png"),
        ("a label map is not on its slice's grid", SpiderSourceError, "masks/spider_5/3.png"),
        ("a label map names no slice", SpiderSourceError, "masks/spider_118/9.png"),
    ],
)
def test_bad_sources_name_the_file(
    spider: Path, tmp_path: Path, breakage: str, error: type[Exception], named: str
) -> None:
    canal = pd.read_csv(spider / "canal.csv")
    if breakage.startswith("a canal row's"):
        first = canal[canal["case_id"] == "spider_7"].iloc[0]
        (spider / "series" / "spider_7" / f"{first.instance_number}.dcm").unlink()
    elif breakage.startswith("a case folder"):
        for path in (spider / "series" / "spider_118").iterdir():
            path.unlink()
    elif breakage.startswith("a file is not"):
        (spider / "series" / "spider_5" / "1.dcm").write_bytes(b"not an image")
    elif breakage.startswith("gradings"):
        (spider / "gradings.csv").unlink()
    elif breakage.startswith("a label map holds"):
        _png(np.full(SHAPE, 4, dtype=np.uint8), spider / "masks" / "spider_7" / "2.png")
    elif breakage.startswith("a label map is not"):
        _png(np.zeros((SHAPE[0], SHAPE[1] + 1), dtype=np.uint8), spider / "masks/spider_5/3.png")
    elif breakage.startswith("a label map names"):
        _png(np.zeros(SHAPE, dtype=np.uint8), spider / "masks" / "spider_118" / "9.png")
    else:
        canal.loc[3, "x"] = SHAPE[1] + 5.0
        canal.to_csv(spider / "canal.csv", index=False)
    with pytest.raises(error) as err:
        import_spider(spider, tmp_path / "out", progress=False)
    assert named in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


def test_the_command_line(spider: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = CliRunner().invoke(app, ["import", "spider", str(spider), str(out), "--no-progress"])
    assert run.exit_code == 0, run.output
    assert "3 studies, 15 canal points, 15 disc centres, 9 DICOM files, 9 label maps" in run.output
    again = CliRunner().invoke(app, ["import", "spider", str(spider), str(out)])
    assert again.exit_code == 0 and "already imported" in again.output
    args = ["import", "spider", str(spider), str(tmp_path / "o2"), "--id-base", "1000"]
    low = CliRunner().invoke(app, args)
    assert low.exit_code == 2 and "below 2**32" in low.output
    missing = CliRunner().invoke(app, ["import", "spider", str(tmp_path / "nope"), str(out)])
    assert missing.exit_code == 2 and "nope: not found" in missing.output


# ------------------------------------------------------------------------------ the vendor copy
def _vendor_module():
    spec = importlib.util.spec_from_file_location("vendor_spider", VENDOR_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_vendored_tarball_is_reproducible_and_imports(spider: Path, tmp_path: Path) -> None:
    vendor = _vendor_module()
    first = vendor.build(spider, tmp_path / "one" / "spider-t2space.tar.xz")
    second = vendor.build(spider, tmp_path / "two" / "spider-t2space.tar.xz")
    assert first.read_bytes() == second.read_bytes()  # a rebuild is byte-identical
    with tarfile.open(first) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names == sorted(names)
        assert all(m.mtime == 0 and m.uid == m.gid == 0 and not m.uname for m in members)
        assert {"truth.csv", "canal.csv", "cases.csv", "gradings.csv", "excluded.csv"} <= set(names)
        assert "masks/spider_5/1.png" in names and "series/spider_118/3.dcm" in names
        original = (spider / "series" / "spider_7" / "2.dcm").read_bytes()
        packed = tar.extractfile("series/spider_7/2.dcm").read()
    before, after = pydicom.dcmread(io.BytesIO(original)), pydicom.dcmread(io.BytesIO(packed))
    n = len(before.PixelData)
    assert original[:-n] == packed[:-n]  # every header byte as it was
    assert after.pixel_array.dtype == np.uint16 and not (after.pixel_array % 8).any()
    expected = (np.rint(before.pixel_array / 8) * 8).astype(np.uint16)
    assert np.array_equal(after.pixel_array, expected)
    assert (before.pixel_array % 8).any()  # the test data did need rounding

    imported = import_spider(first, tmp_path / "out", progress=False)
    reference = import_spider(spider, tmp_path / "ref", progress=False)
    assert imported.studies == 3 and imported.fingerprint != reference.fingerprint
    assert csv_bytes(tmp_path / "out") == csv_bytes(tmp_path / "ref")
    assert os.path.getsize(first) > 0


def test_an_unknown_grade_names_the_file_the_case_and_the_value(
    spider: Path, tmp_path: Path
) -> None:
    gradings = pd.read_csv(spider / "gradings.csv")
    gradings.loc[1, "pfirrmann"] = 7  # Pfirrmann grades run 1-5
    gradings.loc[2, "disc_bulging"] = 2  # a finding is 0 or 1
    gradings.to_csv(spider / "gradings.csv", index=False)
    with pytest.raises(SpiderFormatError) as err:
        import_spider(spider, tmp_path / "out", progress=False)
    text = str(err.value)
    assert "gradings.csv" in text and "pfirrmann = '7'" in text and "disc_bulging = '2'" in text
    assert not (tmp_path / "out").exists()


def test_an_import_by_an_older_spinegrade_is_written_again(spider: Path, tmp_path: Path) -> None:
    # Format 1 wrote no disc grades; a demo folder from then must keep working, not stop.
    out = tmp_path / "imports" / "out"
    import_spider(spider, out, progress=False)
    marker = json.loads((out / "import.json").read_text())
    (out / "import.json").write_text(json.dumps(marker | {"format": 1}))
    (out / "task.yaml").unlink()
    (out / "train.csv").write_text("study_id\n")
    again = import_spider(spider, out, progress=False)
    assert not again.skipped
    assert json.loads((out / "import.json").read_text())["format"] == marker["format"]
    assert dataset_task(out) == SPIDER_DISCS and len(pd.read_csv(out / "train.csv")) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # nothing left beside it
    assert import_spider(spider, out, progress=False).skipped
