"""Build models from a :class:`~spinegrade.config.Config`; rebuild saved ones from their sidecar.

Variants are configs, never copies of code: every knob of the grader and the localiser is a config
field, and a saved model's sidecar stores the exact build arguments (``spec``), so a run folder
rebuilds its models without importing any config by name.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from spinegrade.config import Config
from spinegrade.constants import LEVELS
from spinegrade.models.grader import SpineGrader
from spinegrade.models.localizer_net import LevelLocalizer
from spinegrade.weights import WeightsError, load_weights, read_sidecar

MODEL_KINDS: dict[str, type[nn.Module]] = {"grader": SpineGrader, "localizer": LevelLocalizer}


def build_grader(cfg: Config, n_targets: int = 1, *, pretrained: bool | None = None) -> SpineGrader:
    """The grader of ``cfg.model`` for ``cfg.crops.slices``-slice crops, ``n_targets`` triplets.

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
        n_levels=len(LEVELS) if m.level_embedding else 0,
        feature_index=m.feature_index,
        pretrained=m.pretrained if pretrained is None else pretrained,
        pretrained_path=m.pretrained_path,
        backbone_kwargs=m.backbone_kwargs,
    )


def build_localizer(
    cfg: Config, n_targets: int = len(LEVELS), *, pretrained: bool | None = None
) -> LevelLocalizer:
    """The stage-1 net of ``cfg.localizer`` with ``n_targets`` heatmaps (5 spinal, 10 foraminal)."""
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
    """Rebuild and load a model saved by :func:`spinegrade.weights.save_weights`: (model, meta).

    ``path`` is the ``.safetensors`` file or its folder. The model is returned in eval mode.
    """
    sidecar = read_sidecar(path)
    if not sidecar.get("spec"):
        raise WeightsError(f"{path}: the sidecar has no model spec; it was not saved by spinegrade")
    model = build_from_spec(sidecar["spec"])
    meta = load_weights(model, path, device=device)
    return model.to(device).eval(), meta


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """AdamW-style groups: no weight decay on biases, norms and embeddings (1-D or learned tokens),
    and ``lr * backbone_lr_scale`` for the (pretrained) ``model.encoder``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = name.startswith("encoder.")
        no_decay = param.ndim <= 1 or name.endswith(("_embed", "_token", "embed.weight"))
        groups.setdefault((in_backbone, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": lr * (backbone_lr_scale if in_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
        }
        for (in_backbone, no_decay), params in sorted(groups.items())
    ]


def build_optimizer(
    model: nn.Module, cfg: Config, *, lr: float | None = None, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """The optimiser of ``cfg.optim`` at ``cfg.train.lr`` (``lr``/``weight_decay`` override, e.g.
    with ``cfg.localizer.lr`` for stage 1)."""
    lr = cfg.train.lr if lr is None else lr
    wd = cfg.optim.weight_decay if weight_decay is None else weight_decay
    groups = parameter_groups(model, lr, wd, cfg.optim.backbone_lr_scale)
    name = cfg.optim.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"optim.name={cfg.optim.name!r} is not supported; use 'adamw' or 'sgd'")


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule of ``cfg.optim``: linear warm-up over ``warmup_frac`` of the steps, then
    cosine decay to 0 (``cosine``) or flat (``constant``). Call ``scheduler.step()`` every step."""
    warmup = round(cfg.optim.warmup_frac * total_steps)
    kind = cfg.optim.scheduler.lower()
    if kind not in ("cosine", "constant"):
        raise ValueError(f"optim.scheduler={cfg.optim.scheduler!r}: use 'cosine' or 'constant'")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
