"""Build models from a :class:`~spinegrade.config.Config`; rebuild saved ones from their sidecar.

Variants are configs, never copies of code: every knob of the grader and the localiser is a config
field, and a saved model's sidecar stores the exact build arguments (``spec``), so a run folder
rebuilds its models without importing any config by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from spinegrade.config import Config
from spinegrade.models.grader import SpineGrader
from spinegrade.models.localizer_net import LevelLocalizer
from spinegrade.models.weights import WeightsError, load_weights, read_sidecar
from spinegrade.task import LABEL_CLASSES, LEVELS, SEVERITIES

MODEL_KINDS: dict[str, type[nn.Module]] = {"grader": SpineGrader, "localizer": LevelLocalizer}


def build_grader(
    cfg: Config,
    n_targets: int = 1,
    *,
    pretrained: bool | None = None,
    n_classes: int = len(SEVERITIES),
) -> SpineGrader:
    """The grader of ``cfg.model`` for ``cfg.crops.slices``-slice crops, ``n_targets`` sets of
    ``n_classes`` logits.

    ``pretrained`` overrides ``cfg.model.pretrained`` (e.g. False when weights will be loaded).
    """
    m = cfg.model
    return SpineGrader(
        m.backbone,
        in_slices=cfg.crops.slices,
        token_grid=m.token_grid,
        dim=m.dim,
        depth=m.depth,
        heads=m.heads,
        mlp_ratio=m.mlp_ratio,
        dropout=m.dropout,
        attn_dropout=m.attn_dropout,
        drop_path=m.drop_path,
        n_targets=n_targets,
        n_classes=n_classes,
        n_levels=len(LEVELS) if m.level_embedding else 0,
        feature_index=m.feature_index,
        pretrained=m.pretrained if pretrained is None else pretrained,
        pretrained_path=m.pretrained_path,
        backbone_kwargs=m.backbone_kwargs,
    )


def build_localizer(
    cfg: Config, n_targets: int = len(LEVELS), *, pretrained: bool | None = None, seg: bool = False
) -> LevelLocalizer:
    """The stage-1 net of ``cfg.localizer`` with ``n_targets`` heatmaps (5 spinal, 10 foraminal);
    ``seg``: with the head that draws the label maps' classes (for data that have maps)."""
    c = cfg.localizer
    return LevelLocalizer(
        c.backbone,
        n_targets=n_targets,
        context=c.context,
        decoder_channels=c.decoder_channels,
        slice_layers=c.slice_layers,
        slice_heads=c.slice_heads,
        dropout=c.dropout,
        drop_path=c.drop_path,
        pretrained=c.pretrained if pretrained is None else pretrained,
        pretrained_path=c.pretrained_path,
        backbone_kwargs=c.backbone_kwargs,
        seg_classes=len(LABEL_CLASSES) if seg else 0,
    )


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``spec`` (``{"kind", "kwargs"}``), random non-pretrained init."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in MODEL_KINDS:
        raise WeightsError(f"model spec kind {kind!r} is not one of {sorted(MODEL_KINDS)}")
    kwargs = dict(spec.get("kwargs", {}))
    kwargs["pretrained"] = False  # the saved weights replace any ImageNet init: never hit the hub
    kwargs["pretrained_path"] = None
    return MODEL_KINDS[kind](**kwargs)


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load a model saved by :func:`.weights.save_weights`: (model, meta).

    ``path`` is the ``.safetensors`` file or its folder. The model is returned in eval mode.
    """
    sidecar = read_sidecar(path)
    if not sidecar.get("spec"):
        raise WeightsError(f"{path}: the sidecar has no model spec; it was not saved by spinegrade")
    model = build_from_spec(sidecar["spec"])
    meta = load_weights(model, path, device=device)
    # Where the trained backbone started (runs older than this record say "unknown").
    model.encoder.init_source = sidecar.get("init", {"source": "unknown"})
    return model.to(device).eval(), meta


def device_of(net: Any) -> torch.device:
    """Where a network runs: its weights' device (an ONNX Runtime network says its own, CPU)."""
    own = getattr(net, "device", None)
    return own if isinstance(own, torch.device) else next(net.parameters()).device
