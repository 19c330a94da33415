"""Weights on disk and pretrained backbones.

* :func:`save_weights` / :func:`load_weights`: ``model.safetensors`` plus a ``model.json`` sidecar
  (format tag, the model's build spec, and caller metadata such as the resolved config and fold).
  Safetensors holds only tensors, so loading a file a user handed us never runs pickled code.
* :func:`create_backbone`: a timm EfficientNet feature extractor for 1-channel MRI slices, with
  ImageNet weights when they are available (timm's hub cache or a local file) and otherwise random
  initialisation plus ONE warning per backbone name. timm itself adapts the 3-channel RGB stem to
  ``in_chans`` (it sums the stem filters over colour channels), which suits grey MRI.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

# Offline machines (and the hidden-test notebook) must not wait on network retries before falling
# back to random init. Set before huggingface_hub is imported; a user who wants downloads sets
# HF_HUB_OFFLINE=0 explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "spinegrade-weights/1"
_WARNED_PRETRAINED: set[str] = set()  # backbone names already warned about (one warning each)


class WeightsError(RuntimeError):
    """A weights file or sidecar that is missing, malformed or does not fit the model."""


# ----------------------------------------------------------------------------- backbones


def create_backbone(
    name: str,
    *,
    in_chans: int = 1,
    out_indices: tuple[int, ...] = (-1,),
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    drop_path: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """A timm ``features_only`` backbone returning the feature maps of ``out_indices``.

    With ``pretrained`` the ImageNet weights come from ``pretrained_path`` (a ``.safetensors`` or
    torch state-dict file, loaded with ``weights_only``) or from timm's hub cache. When neither is
    available the model is randomly initialised and one warning per backbone name is logged.
    """
    if name not in timm.list_models() and name.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown timm backbone {name!r}; pick an EfficientNet from "
            "timm.list_models('*efficientnet*'), e.g. 'efficientnet_b0' or 'tf_efficientnetv2_s'"
        )
    build = dict(
        in_chans=in_chans,
        features_only=True,
        out_indices=tuple(out_indices),
        drop_path_rate=drop_path,
        **kwargs,
    )
    if pretrained and pretrained_path:
        path = Path(pretrained_path)
        if not path.is_file():
            raise WeightsError(
                f"pretrained_path {str(path)!r} does not exist; download the backbone's weights "
                "(safetensors) there or set model.pretrained_path=null"
            )
        overlay = dict(file=str(path))
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **build)
    if pretrained:
        _sync_hub_offline()
        try:
            return timm.create_model(name, pretrained=True, **build)
        except (OSError, RuntimeError, ValueError) as err:
            _warn_no_pretrained(name, err)
    return timm.create_model(name, pretrained=False, **build)


def _sync_hub_offline() -> None:
    """Make huggingface_hub honour HF_HUB_OFFLINE even if it was imported before we set it.

    huggingface_hub reads the variable once, at import; timm imports it, so a program that imported
    timm first would otherwise retry the network for about a minute before the fallback.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    value = os.environ.get("HF_HUB_OFFLINE", "1").strip().lower()
    constants.HF_HUB_OFFLINE = value in ("1", "true", "yes", "on")


def _warn_no_pretrained(name: str, err: Exception) -> None:
    if name in _WARNED_PRETRAINED:
        return
    _WARNED_PRETRAINED.add(name)
    log.warning(
        "No ImageNet weights for backbone %r (%s: %s). Continuing from random initialisation. "
        "To use pretrained weights, set HF_HUB_OFFLINE=0 with internet access, or download the "
        "weights and set model.pretrained_path=FILE (or localizer.pretrained_path).",
        name,
        type(err).__name__,
        str(err).splitlines()[0][:120] if str(err) else "",
    )


# ----------------------------------------------------------------------------- save / load


def weights_paths(path: str | Path) -> tuple[Path, Path]:
    """(``.safetensors`` file, ``.json`` sidecar) for a file path or a folder (``model.*``)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / "model.safetensors"
    return path, path.with_suffix(".json")


def save_weights(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s state dict as safetensors plus a JSON sidecar; return the tensor file.

    The sidecar holds the format tag, the model's build spec (``model.spec`` when it has one, so
    :func:`spinegrade.models.registry.load_model` can rebuild it) and ``meta`` (JSON-serialisable:
    resolved config, fold, group, metrics...). Both files are written atomically.
    """
    tensor_path, sidecar_path = weights_paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    state = _unique_contiguous(model.state_dict())
    tmp = tensor_path.with_name(tensor_path.name + ".tmp")
    save_file(state, str(tmp), metadata={"format": WEIGHTS_FORMAT})
    os.replace(tmp, tensor_path)
    sidecar = {"format": WEIGHTS_FORMAT, "spec": getattr(model, "spec", None), "meta": meta or {}}
    tmp_json = sidecar_path.with_name(sidecar_path.name + ".tmp")
    tmp_json.write_text(json.dumps(sidecar, indent=2, default=_json_default))
    os.replace(tmp_json, sidecar_path)
    return tensor_path


def _unique_contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies; tensors that share storage (tied weights) are stored once per name."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"meta value of type {type(obj).__name__} is not JSON-serialisable")


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """The JSON sidecar of a weights file (``format``, ``spec``, ``meta``)."""
    _, sidecar_path = weights_paths(path)
    if not sidecar_path.is_file():
        raise WeightsError(
            f"{sidecar_path} is missing: it is written next to the weights by training"
        )
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(
            f"{sidecar_path} is not valid JSON ({err}); re-export the weights"
        ) from err
    if sidecar.get("format") != WEIGHTS_FORMAT:
        raise WeightsError(
            f"{sidecar_path}: format {sidecar.get('format')!r}, expected {WEIGHTS_FORMAT!r}"
        )
    return sidecar


def load_weights(
    model: nn.Module, path: str | Path, *, strict: bool = True, device: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load safetensors weights into ``model`` (no unpickling); return the sidecar's ``meta``."""
    tensor_path, _ = weights_paths(path)
    if not tensor_path.is_file():
        raise WeightsError(
            f"{tensor_path} does not exist; train a run first or check the run folder"
        )
    sidecar = read_sidecar(tensor_path)
    state = load_file(str(tensor_path), device=str(device))
    try:
        result = model.load_state_dict(state, strict=strict)
    except RuntimeError as err:
        raise WeightsError(
            f"{tensor_path} does not fit this model (was it saved with another config?): {err}"
        ) from err
    if strict is False and (result.missing_keys or result.unexpected_keys):
        log.warning(
            "%s: %d missing and %d unexpected keys while loading",
            tensor_path,
            len(result.missing_keys),
            len(result.unexpected_keys),
        )
    return sidecar.get("meta", {})
