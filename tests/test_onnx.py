"""`spinegrade export RUN --format onnx` (the ``[onnx]`` extra).

A copy of the session's tiny 2-fold run (conftest) is exported once per module through the CLI;
the tests check the files against torch. The shared run itself is never exported.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spinegrade.cli import app
from spinegrade.task import LEVELS

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
