"""`spinegrade export RUN --format onnx` and prediction by ONNX Runtime (the ``[onnx]`` extra).

A copy of the session's tiny 2-fold run (conftest) is exported once per module through the CLI;
the tests check the files against torch, predict with both engines, and refuse stale exports.
The shared run itself is never exported: the other prediction tests grade it with torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from spinegrade.cli import app
from spinegrade.task import LEVELS, PROB_COLUMNS

pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")
pytest.importorskip("onnxscript", reason="the [onnx] extra is not installed")

NETS = ["localizer_foraminal", "localizer_spinal", "grader_foraminal", "grader_spinal",
        "grader_subarticular"]  # fmt: skip


@pytest.fixture(scope="module")
def exported(tiny_trained, tmp_path_factory) -> tuple[Path, Path, str]:
    """(data, an exported copy of the tiny run, the export command's output)."""
    data, run = tiny_trained
    copy = tmp_path_factory.mktemp("onnx") / "run"
    shutil.copytree(run, copy)
    res = CliRunner().invoke(app, ["export", str(copy), "--format", "onnx"])
    assert res.exit_code == 0, res.output
    return data, copy, res.output


def _probs(kind: str, out: np.ndarray) -> np.ndarray:
    """Grade probabilities, or each localiser target's distribution over (slice, y, x)."""
    x = torch.from_numpy(np.asarray(out, dtype=np.float64))
    return (x.flatten(2) if kind == "localizer" else x).softmax(-1).numpy()


def test_export_writes_checked_onnx_files_beside_the_weights(exported) -> None:
    from spinegrade.models.weights import read_sidecar, sha256

    _, run, output = exported
    for k in (0, 1):
        fold = run / f"fold_{k}"
        for name in NETS:
            weights = fold / f"{name}.safetensors"
            assert (fold / f"{name}.onnx").is_file(), name
            side = json.loads((fold / f"{name}.onnx.json").read_text())
            torch_side = read_sidecar(weights)
            # The weights sidecar's information, and where the file came from.
            assert side["spec"] == torch_side["spec"] and side["init"] == torch_side["init"]
            assert side["meta"] == json.loads(json.dumps(torch_side["meta"]))
            role, what = name.split("_", 1)
            if role == "grader":  # which fold and group it grades; a localiser: its task
                assert side["meta"]["fold"] == k and side["meta"]["group"] == what
            else:
                assert side["meta"]["task"] == what
            assert side["task"] == "rsna2024" and side["opset"] == 18
            assert side["source"] == {"file": weights.name, "sha256": sha256(weights)}
            assert side["onnx_sha256"] == sha256(fold / f"{name}.onnx")
            assert 0 <= side["check"]["max_abs_prob_diff"] <= 1e-4
            if name.startswith("grader"):
                assert side["inputs"]["crops"] == ["batch", 3, 32, 32]  # tiny crops: 3 x 32 px
            else:
                assert side["inputs"]["volumes"] == ["batch", "slices", 64, 64]
            shown = f"fold {k}: {name}.onnx  max |p_onnx - p_torch| = "
            assert shown in output
    assert "10 networks exported to onnx" in output
    assert not list(run.rglob(".*.tmp-*"))  # written atomically: no temporary file left


def test_onnx_runtime_gives_torch_probabilities_on_new_inputs(exported) -> None:
    # Inputs the export's check never saw: other values, another batch size, another slice count
    # (both axes are dynamic).
    from spinegrade.models.onnx import OnnxGrader, OnnxLocalizer, load_onnx
    from spinegrade.models.registry import load_model

    _, run, _ = exported
    rng = np.random.default_rng(7)
    worst = 0.0
    for name in NETS:
        weights = run / "fold_1" / f"{name}.safetensors"
        net, ort_net = load_model(weights)[0], load_onnx(weights, threads=1)
        with torch.no_grad():
            if name.startswith("grader"):
                assert isinstance(ort_net, OnnxGrader)
                x = torch.from_numpy(rng.random((7, 3, 32, 32), dtype=np.float32))
                level = torch.from_numpy(rng.integers(0, len(LEVELS), 7))
                want, got = net(x, level), ort_net(x, level)
                kind = "grader"
            else:
                assert isinstance(ort_net, OnnxLocalizer) and ort_net.n_targets == net.n_targets
                x = torch.from_numpy(rng.random((1, 11, 64, 64), dtype=np.float32))
                want, got = net.heatmaps(x), ort_net.heatmaps(x)
                kind = "localizer"
        assert got.shape == want.shape
        diff = np.abs(_probs(kind, want.numpy()) - _probs(kind, got.numpy())).max()
        worst = max(worst, float(diff))
    assert worst <= 1e-4


def test_predict_with_onnx_runtime_equals_torch_and_says_so(exported, tmp_path: Path) -> None:
    from spinegrade.inference.predict import predict

    data, run, _ = exported
    cache = tmp_path / "work"
    out: dict[str, object] = {}
    for engine in ("torch", "onnx"):
        res = CliRunner().invoke(app, [
            "predict", str(run), str(data), "--out", str(tmp_path / engine / "sub.csv"),
            "--report", str(tmp_path / engine / "r"), "--cache", str(cache), "--no-progress",
            "--engine", engine, "--device", "cpu",
        ])  # fmt: skip
        assert res.exit_code == 0, res.output
        out[engine] = res.output
    assert "on cpu with onnxruntime 1." in str(out["onnx"])  # the summary line names the engine
    assert "on cpu with torch 2." in str(out["torch"])
    a, b = (pd.read_csv(tmp_path / e / "sub.csv") for e in ("torch", "onnx"))
    assert a["row_id"].tolist() == b["row_id"].tolist()
    diff = np.abs(a[list(PROB_COLUMNS)].to_numpy() - b[list(PROB_COLUMNS)].to_numpy()).max(axis=1)
    # Each network agrees to 1e-4 (above); end to end a located point that falls half-way between
    # two slices (an untrained localiser's expected slice is the stack's middle) may be cut one
    # slice apart by the two engines' last-bit differences, which moves that target a little.
    assert (diff <= 1e-4).mean() >= 0.95 and diff.max() <= 1e-2, np.sort(diff)[-5:]
    for sid in pd.read_csv(tmp_path / "onnx" / "studies.csv")["study_id"].unique():
        grades = {e: json.loads((tmp_path / e / "r" / str(sid) / "grades.json").read_text())
                  for e in ("torch", "onnx")}  # fmt: skip
        assert grades["onnx"]["model"]["engine"].startswith("onnxruntime ")
        assert grades["torch"]["model"]["engine"].startswith("torch ")
        for col, t in grades["onnx"]["targets"].items():
            assert t["source"] == grades["torch"]["targets"][col]["source"]
            p, q = t["point_lps_mm"], grades["torch"]["targets"][col]["point_lps_mm"]
            assert (p is None) == (q is None) and (p is None or np.allclose(p, q, atol=0.05))
    html = (tmp_path / "onnx" / "r" / "index.html").read_text()
    assert "graded by onnxruntime 1." in html
    # auto: the exported run is graded by ONNX Runtime (the library's default, as the CLI's).
    auto = predict(run, data, tmp_path / "auto.csv", cache_dir=cache, progress=False)
    assert auto.engine.startswith("onnxruntime ")


def test_engine_choice(exported, tmp_path: Path, caplog) -> None:
    from spinegrade.inference.ensemble import Predictor, resolve_engine
    from spinegrade.models.onnx import OnnxError

    _, run, _ = exported
    folds = [run / "fold_0", run / "fold_1"]
    assert resolve_engine("auto", folds, "cpu") == "onnx"
    assert resolve_engine("torch", folds, "cpu") == "torch"
    assert resolve_engine("auto", folds, "cuda") == "torch"  # ONNX Runtime here is CPU-only
    with pytest.raises(ValueError, match="--device cpu"):
        resolve_engine("onnx", folds, "cuda")
    with pytest.raises(ValueError, match="auto, torch, onnx"):
        resolve_engine("tensorrt", folds, "cpu")
    # A run exported in part: auto falls back to torch and says which file is missing; onnx
    # names it.
    part = tmp_path / "part"
    shutil.copytree(run, part)
    (part / "fold_1" / "grader_spinal.onnx").unlink()
    with caplog.at_level("WARNING"):
        assert resolve_engine("auto", [part / "fold_0", part / "fold_1"], "cpu") == "torch"
    assert "grader_spinal.safetensors has no ONNX export" in caplog.text
    with pytest.raises(OnnxError, match=r"grader_spinal.onnx \(or its sidecar\) is missing"):
        Predictor.from_run_dir(part, device="cpu", engine="onnx")
    assert Predictor.from_run_dir(part, device="cpu").engine == "torch"
    assert Predictor.from_run_dir(run, device="cpu").engine == "onnx"


def test_an_export_older_than_its_weights_is_refused(exported, tmp_path: Path) -> None:
    from spinegrade.inference.ensemble import Predictor
    from spinegrade.models.onnx import OnnxError, load_onnx
    from spinegrade.models.registry import load_model
    from spinegrade.models.weights import read_sidecar, save_weights

    data, run, _ = exported
    stale = tmp_path / "run"
    shutil.copytree(run, stale)
    # The localiser retrained after the export: other weights under the same name.
    weights = stale / "fold_0" / "localizer_spinal.safetensors"
    net, _ = load_model(weights)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.01)
    save_weights(net, weights, meta=read_sidecar(weights)["meta"])
    for engine in ("auto", "onnx"):
        res = CliRunner().invoke(app, [
            "predict", str(stale), str(data), "--out", str(tmp_path / "sub.csv"), "--cache",
            str(tmp_path / "w"), "--no-progress", "--engine", engine,
        ])  # fmt: skip
        assert res.exit_code == 2, res.output
        assert "localizer_spinal.onnx was exported from other weights" in res.output
        assert "re-export: spinegrade export" in res.output
    assert Predictor.from_run_dir(stale, device="cpu", engine="torch").engine == "torch"
    # A swapped ONNX file (not the one that was checked) is refused as well.
    fold = stale / "fold_0"
    shutil.copyfile(fold / "grader_spinal.onnx", fold / "grader_foraminal.onnx")
    with pytest.raises(OnnxError, match="not the file that was exported and checked"):
        load_onnx(fold / "grader_foraminal.safetensors")
    # Fold 0 exported again, the run predicts with ONNX Runtime.
    again = CliRunner().invoke(app, ["export", str(stale), "--folds", "0"])
    assert again.exit_code == 0, again.output
    assert Predictor.from_run_dir(stale, device="cpu", engine="onnx").engine == "onnx"


def test_an_export_that_disagrees_with_torch_is_not_kept(exported, tmp_path: Path, monkeypatch):
    # An exporter that got the network wrong (here: its weights changed on the way) fails the
    # check against torch: an error stating the difference, and no ONNX file or sidecar left.
    import spinegrade.models.onnx as onnx_mod
    from spinegrade.models.onnx import OnnxError, export_network

    _, run, _ = exported
    fold = tmp_path / "fold_0"
    shutil.copytree(run / "fold_0", fold)
    for f in fold.glob("*.onnx*"):
        f.unlink()
    export_graph = onnx_mod._export_graph

    def wrong(kind, net, example, path):
        with torch.no_grad():
            net.head[-1].bias.add_(torch.tensor([0.0, 1.0, 0.0]))  # one grade favoured
        export_graph(kind, net, example, path)
        with torch.no_grad():
            net.head[-1].bias.sub_(torch.tensor([0.0, 1.0, 0.0]))

    monkeypatch.setattr(onnx_mod, "_export_graph", wrong)
    with pytest.raises(OnnxError, match=r"differ by \d\.\d+e-0\d in probability"):
        export_network(fold / "grader_spinal.safetensors", size=32)
    assert not list(fold.glob("grader_spinal.onnx*")) and not list(fold.glob(".*tmp*"))
