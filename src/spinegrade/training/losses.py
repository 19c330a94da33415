"""Losses shaped like the RSNA 2024 metric, and the stage-1 localiser loss.

The metric weights every scored row by its true class (Normal/Mild 1, Moderate 2, Severe 4) and
normalises by the sum of weights, and adds a study-level "any severe spinal" binary term. Training
on the same objective keeps the model's probabilities calibrated for exactly what is scored.
Missing labels (-1: empty cells of train.csv) are ignored everywhere, as the metric ignores them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from spinegrade.models.localizer_net import MASKED_LOGIT as _MASKED
from spinegrade.models.localizer_net import LocalizerOutput
from spinegrade.task import CLASS_WEIGHTS, SEVERITY_INDEX

IGNORE = -1
SEVERE = SEVERITY_INDEX["Severe"]
_EPS = 1e-7


def weighted_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Sequence[float] = CLASS_WEIGHTS,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``sum w * -ln p_true / sum w`` over labelled rows, w by true class (the metric's terms).

    ``logits`` (..., 3), ``labels`` (...) with -1 for missing. Returns 0 (with grad) when no row is
    labelled, so a batch of empty cells does not produce NaN.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1).long()
    weight = torch.as_tensor(class_weights, dtype=flat_logits.dtype, device=logits.device)
    if not bool((flat_labels != IGNORE).any()):
        return flat_logits.sum() * 0.0
    return F.cross_entropy(
        flat_logits,
        flat_labels,
        weight=weight,
        ignore_index=IGNORE,
        label_smoothing=label_smoothing,
    )


def any_severe_loss(
    severe_probs: torch.Tensor,
    labels: torch.Tensor,
    class_weights: Sequence[float] = CLASS_WEIGHTS,
) -> torch.Tensor:
    """The metric's any-severe-spinal term for studies laid out as rows.

    ``severe_probs`` (B, 5): P(Severe) of the five spinal levels of each study; ``labels`` (B, 5)
    their grades (0/1/2, -1 missing). Per study: target = any level Severe, prediction = max over
    its labelled levels of P(Severe), weight = max class weight over its labelled levels (as in
    :mod:`spinegrade.evaluation.metrics`, where unlabelled cells are not rows of the solution).
    Returns the weighted binary log loss ``sum w * bce / sum w``; studies with no labelled level are
    skipped.
    """
    labels = labels.long()
    valid = labels != IGNORE
    weight_table = torch.as_tensor(class_weights, dtype=torch.float32, device=labels.device)
    study_weight = (weight_table[labels.clamp(min=0)] * valid).max(dim=1).values  # 0: unlabelled
    target = ((labels == SEVERE) & valid).any(dim=1).float()
    pred = severe_probs.float().masked_fill(~valid, 0.0).max(dim=1).values
    return _weighted_bce(pred, target, study_weight)


def any_severe_loss_grouped(
    severe_probs: torch.Tensor,
    labels: torch.Tensor,
    study_index: torch.Tensor,
    class_weights: Sequence[float] = CLASS_WEIGHTS,
) -> torch.Tensor:
    """:func:`any_severe_loss` for one-row-per-level batches (the per-group grader's layout).

    ``severe_probs`` (N,), ``labels`` (N,), ``study_index`` (N,) any integer study ids: rows of
    the same study are pooled (max P(Severe), any Severe, max weight). When a batch holds only some
    levels of a study this is the term over those levels: sample whole studies for the exact term.
    """
    if study_index.numel() == 0:
        return severe_probs.sum() * 0.0
    _, study = torch.unique(study_index, return_inverse=True)
    labels = labels.long()
    valid = labels != IGNORE
    weight_table = torch.as_tensor(class_weights, dtype=torch.float32, device=labels.device)

    def per_study_max(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(int(study.max()) + 1)
        return out.scatter_reduce(0, study, values, reduce="amax", include_self=True)

    pred = per_study_max(severe_probs.float().masked_fill(~valid, 0.0))
    target = per_study_max(((labels == SEVERE) & valid).float())
    weight = per_study_max(weight_table[labels.clamp(min=0)] * valid)
    return _weighted_bce(pred, target, weight)


def _weighted_bce(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum w * bce(pred, target) / sum w``; 0 (keeping the graph) when all weights are 0."""
    pred = pred.clamp(_EPS, 1 - _EPS)
    bce = -(target * pred.log() + (1 - target) * (1 - pred).log())
    total = weight.sum()
    if float(total) == 0.0:
        return pred.sum() * 0.0
    return (weight * bce).sum() / total


# A logit that no softmax picks: the grades a condition does not have (a binary finding beside
# Pfirrmann's five grades in one network). Finite, so masked rows never make NaN.
MASKED_GRADE = -1e4


def select_heads(logits: torch.Tensor, head: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    """(B, T, K) logits -> (B, 1, K): each row's own output ``head`` (B,), its classes beyond
    ``grades`` (B,) masked; the layout :func:`grading_loss` takes."""
    rows = logits[torch.arange(len(logits), device=logits.device), head.long()]
    classes = torch.arange(logits.shape[-1], device=logits.device)
    keep = classes[None, :] < grades.long()[:, None]
    return torch.where(keep, rows, torch.full_like(rows, MASKED_GRADE))[:, None]


def ordinal_targets(
    labels: torch.Tensor, grades: torch.Tensor, ordinal: torch.Tensor, n_classes: int, sigma: float
) -> torch.Tensor:
    """Target distributions (N, C) of rows ``labels`` (N,): one-hot, or for ``ordinal`` rows with
    three or more ``grades`` a Gaussian of SD ``sigma`` (in grades) about the true grade.

    A reader's Pfirrmann 3 is often another reader's 2 or 4, never their 5 (kappa about 0.6
    between readers): a target that spreads to the neighbouring grades punishes a near miss less
    than a far one, as the quadratic-weighted kappa does. Grades a row's condition lacks get 0.
    Unlabelled rows (-1) get an all-zero row.
    """
    classes = torch.arange(n_classes, device=labels.device, dtype=torch.float32)
    y = labels.float().clamp(min=0)[:, None]
    soft = torch.exp(-0.5 * ((classes[None] - y) / max(sigma, 1e-6)) ** 2)
    hard = (classes[None] == y).float()
    spread = (ordinal.bool() & (grades >= 3))[:, None] & (sigma > 0)
    q = torch.where(spread, soft, hard) * (classes[None] < grades[:, None])
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
    return q * (labels >= 0)[:, None]


def soft_weighted_ce(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
    class_weights: Sequence[float],
) -> torch.Tensor:  # fmt: skip
    """``sum w * -sum q ln p / sum w`` over labelled rows, w by true class: :func:`weighted_ce`
    with target distributions ``targets`` (N, C) in place of the one-hot rows."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    lab = labels.reshape(-1).long()
    valid = lab != IGNORE
    if not bool(valid.any()):
        return flat.sum() * 0.0
    weight = torch.as_tensor(class_weights, dtype=flat.dtype, device=flat.device)[lab.clamp(min=0)]
    weight = weight * valid
    per_row = -(targets.reshape(flat.shape) * flat.log_softmax(-1)).sum(-1)
    return (weight * per_row).sum() / weight.sum()


def grading_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    study_index: torch.Tensor | None = None,
    any_severe_weight: float = 0.0,
    class_weights: Sequence[float] = CLASS_WEIGHTS,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Weighted CE plus (for spinal) ``any_severe_weight`` x the any-severe term.

    ``logits`` (B, T, 3), ``labels`` (B, T). The any-severe term uses, in this order: rows grouped
    by ``study_index`` (B,) when given (then T must be 1), else the T=5 levels of each row as one
    study. Returns ``{"loss", "ce", "any_severe"}``.
    """
    ce = weighted_ce(logits, labels, class_weights, label_smoothing)
    any_term = ce.new_zeros(())
    if any_severe_weight > 0:
        severe = logits.float().softmax(-1)[..., SEVERE]
        if study_index is not None:
            if logits.shape[1] != 1:
                raise ValueError("study_index grouping needs one target per row (T=1)")
            any_term = any_severe_loss_grouped(
                severe[:, 0], labels[:, 0], study_index, class_weights
            )
        elif logits.shape[1] == 5:
            any_term = any_severe_loss(severe, labels, class_weights)
        else:
            raise ValueError(
                f"any-severe term needs study_index or 5 levels a row; logits {tuple(logits.shape)}"
            )
    return {
        "loss": ce + any_severe_weight * any_term,
        "ce": ce.detach(),
        "any_severe": any_term.detach(),
    }


def localizer_loss(
    out: LocalizerOutput,
    target_xy: torch.Tensor,
    target_z: torch.Tensor,
    valid: torch.Tensor,
    *,
    sigma: float = 1.5,
    slice_sigma: float = 0.75,
    slice_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Stage-1 loss: which slice (soft CE over slices) + where in it (soft CE over the heatmap).

    ``target_xy`` (B, T, 2) in input pixels, ``target_z`` (B, T) slice index, ``valid`` (B, T)
    bool (a level may be unlabelled). Both targets are Gaussians (``sigma`` in heatmap cells,
    ``slice_sigma`` in slices) because annotators' clicks and chosen slices vary by about that
    much; a Gaussian target tolerates it where a one-hot would punish it.
    Returns ``{"loss", "slice", "heatmap"}``.
    """
    heat = out["heatmaps"].float()  # (B, T, S, h, w)
    b, t, s, hh, ww = heat.shape
    if not bool(valid.any()):
        zero = heat.sum() * 0.0
        return {"loss": zero, "slice": zero.detach(), "heatmap": zero.detach()}
    v = valid.bool()
    # Unlabelled targets may hold NaN: zero them so no NaN reaches the gradient through 0 * NaN.
    target_z = torch.where(v, target_z.float(), 0.0)
    target_xy = torch.where(v[..., None], target_xy.float(), 0.0)
    # Which slice: Gaussian over the real slices (padded ones have logits at the mask value).
    slice_logits = out["slice_logits"].float()
    zs = torch.arange(s, device=heat.device, dtype=torch.float32)
    q_z = torch.exp(-0.5 * ((zs - target_z[..., None]) / slice_sigma) ** 2)
    q_z = q_z * (slice_logits > _MASKED / 2)
    q_z = q_z / q_z.sum(-1, keepdim=True).clamp(min=1e-12)
    slice_ce = -(q_z * slice_logits.log_softmax(-1)).sum(-1)
    # Where: the heatmap of the labelled slice, against a Gaussian at the point (in cells).
    z_true = target_z.round().long().clamp(0, s - 1)
    plane = heat.gather(2, z_true[..., None, None, None].expand(b, t, 1, hh, ww)).squeeze(2)
    image_h, image_w = out["image_hw"]
    stride_x, stride_y = image_w / ww, image_h / hh  # input pixels per heatmap cell
    cx = (target_xy[..., 0] + 0.5) / stride_x - 0.5
    cy = (target_xy[..., 1] + 0.5) / stride_y - 0.5
    gx = torch.arange(ww, device=heat.device, dtype=torch.float32)
    gy = torch.arange(hh, device=heat.device, dtype=torch.float32)
    q = (
        torch.exp(-0.5 * (((gx - cx[..., None]) / sigma) ** 2))[..., None, :]
        * torch.exp(-0.5 * (((gy - cy[..., None]) / sigma) ** 2))[..., :, None]
    )
    q = q.flatten(2) / q.flatten(2).sum(-1, keepdim=True).clamp(min=1e-12)
    heat_ce = -(q * plane.flatten(2).log_softmax(-1)).sum(-1)
    slice_term, heat_term = slice_ce[v].mean(), heat_ce[v].mean()
    return {
        "loss": heat_term + slice_weight * slice_term,
        "slice": slice_term.detach(),
        "heatmap": heat_term.detach(),
    }


def segmentation_loss(
    seg_logits: torch.Tensor, seg: torch.Tensor | None, ignore: int = 255
) -> dict[str, torch.Tensor]:
    """Label maps' loss: cross-entropy plus soft Dice over the drawn classes (as nnU-Net).

    ``seg_logits`` (B, S, C, h, w) at the heatmaps' stride; ``seg`` (B, S, H, W) the maps on the
    input's pixels, ``ignore`` where a pixel has no class (slices without a map, padding). The
    loss is taken per heatmap cell against the share of each class among the cell's pixels (a
    cell on a disc's edge is part disc, part vertebra), which costs a sixteenth of scoring
    upsampled logits pixel by pixel. The discs fill ~2% of a sagittal slice: cross-entropy alone
    would learn the background and the vertebrae, the Dice term weighs each class by its own
    area. Returns ``{"loss", "ce", "dice"}``; zero, with a gradient path (DDP needs every
    parameter's), when nothing is drawn or ``seg`` is None (a batch without maps).
    """
    b, s, c, hh, ww = seg_logits.shape
    logp = seg_logits.float().reshape(b * s, c, hh, ww).log_softmax(1)
    known = None
    if seg is not None:
        target = seg.reshape(b * s, 1, *seg.shape[-2:])
        with torch.no_grad():
            share = torch.cat(
                [F.adaptive_avg_pool2d((target == k).float(), (hh, ww)) for k in range(c)], 1
            )  # (N, C, h, w): each class's share of the cell
            known = F.adaptive_avg_pool2d((target != ignore).float(), (hh, ww))[:, 0] > 0.999
    if known is None or not bool(known.any()):
        zero = logp.sum() * 0.0
        return {"loss": zero, "ce": zero.detach(), "dice": zero.detach()}
    ce = -(share * logp).sum(1)[known].mean()
    prob = logp.exp().permute(0, 2, 3, 1)[known]  # (N, C) fully drawn cells only
    q = share.permute(0, 2, 3, 1)[known]
    inter, total = (prob * q).sum(0), prob.sum(0) + q.sum(0)
    drawn = q[:, 1:].sum(0) > 0  # foreground classes present in this batch
    dice_c = 1 - (2 * inter[1:] + 1.0) / (total[1:] + 1.0)
    dice = dice_c[drawn].mean() if bool(drawn.any()) else ce * 0.0
    return {"loss": ce + dice, "ce": ce.detach(), "dice": dice.detach()}
