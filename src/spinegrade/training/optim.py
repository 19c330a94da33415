"""The optimiser: parameter groups (backbone and head learning rates) and the schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from spinegrade.config import OptimConfig

# --------------------------------------------------------------------------------- schedules


# SpineGrader and LevelLocalizer both keep their (pretrained) timm backbone in ``self.encoder``.
BACKBONE_PREFIX = "encoder."


def parameter_groups(
    model: nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> list[dict[str, Any]]:
    """Optimiser groups: weight decay on matrices and kernels (ndim > 1), none on biases and norms;
    ``lr * backbone_lr_scale`` for the backbone's parameters (``encoder.*``), ``lr`` for the rest.

    A pretrained backbone often wants a smaller step than the freshly initialised transformer and
    heads. With scale 1.0 there are exactly two groups, [decay, no decay], in parameter order.
    Every trainable parameter is in exactly one group; empty groups are left out.
    """
    if backbone_lr_scale < 0:
        raise ValueError(f"optim.backbone_lr_scale must be >= 0, got {backbone_lr_scale}")
    split_backbone = backbone_lr_scale != 1.0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        in_backbone = split_backbone and name.startswith(BACKBONE_PREFIX)
        groups.setdefault((in_backbone, param.ndim <= 1), []).append(param)
    return [
        {
            "params": groups[key],
            "lr": lr * backbone_lr_scale if key[0] else lr,
            "weight_decay": 0.0 if key[1] else weight_decay,
        }
        # head before backbone, decay before no decay
        for key in ((False, False), (False, True), (True, False), (True, True))
        if groups.get(key)
    ]


def make_optimizer(
    model: nn.Module, lr: float, cfg: OptimConfig, weight_decay: float | None = None
) -> torch.optim.Optimizer:
    """AdamW or SGD over :func:`parameter_groups` (``weight_decay`` overrides ``cfg``'s).

    Each group's ``lr`` is its base learning rate; :func:`set_lr` rescales it every step.
    """
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    groups = parameter_groups(model, lr, wd, cfg.backbone_lr_scale)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise ValueError(f"optim.name must be adamw or sgd, got {cfg.name!r}")


def lr_at(step: int, total: int, base_lr: float, cfg: OptimConfig) -> float:
    """Linear warm-up then cosine decay to 1% (or constant): a pure function of the step."""
    warm = max(1, round(cfg.warmup_frac * total)) if cfg.warmup_frac > 0 else 0
    if step < warm:
        return base_lr * (step + 1) / warm
    if cfg.scheduler == "constant":
        return base_lr
    if cfg.scheduler != "cosine":
        raise ValueError(f"optim.scheduler must be cosine or constant, got {cfg.scheduler!r}")
    t = (step - warm) / max(1, total - warm)
    return base_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def set_lr(
    optimizer: torch.optim.Optimizer,
    base_lrs: list[float],
    step: int,
    total: int,
    cfg: OptimConfig,
) -> None:
    """Set every group to :func:`lr_at` of its own base lr, so warm-up and decay keep the ratio
    between backbone and head."""
    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
        group["lr"] = lr_at(step, total, base, cfg)
