"""The two trained stages of a fold: the localiser (stage 1) and the graders (stage 2).

Each trainer builds its network from the config, wraps its loss for
:func:`spinegrade.training.engine.fit` and validates on the fold's held-out studies;
:mod:`spinegrade.training.cv` decides which fold trains what and where the weights go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from spinegrade.config import Config
from spinegrade.data.grader_dataset import GraderDataset, collate_levels
from spinegrade.data.label_maps import UNKNOWN
from spinegrade.data.localizer_dataset import LocalizerDataset, collate_stacks
from spinegrade.data.studies import StudyData
from spinegrade.localization.errors import localizer_hits_errors, summarize_hits_errors
from spinegrade.localization.points import StudyPoints
from spinegrade.localization.samples import LocalizerSample
from spinegrade.localization.tasks import configured_tasks
from spinegrade.task import LEVELS, RSNA_2024, Task
from spinegrade.training.engine import FitSpec, fit
from spinegrade.training.init_from import start_net
from spinegrade.training.losses import (
    grading_loss,
    localizer_loss,
    ordinal_targets,
    segmentation_loss,
    select_heads,
    soft_weighted_ce,
)
from spinegrade.util.runtime import Runtime

# ------------------------------------------------------------------------------ stage-1 training


class _LocalizerLoss:
    """``step_loss`` of :func:`spinegrade.training.engine.fit` for the localiser: the points'
    loss, plus ``seg_weight`` times the label maps' where the net draws them."""

    def __init__(self, sigma: float, seg_weight: float = 0.0) -> None:
        self.sigma, self.seg_weight = sigma, seg_weight

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = model(batch["volume"], batch["mask"])
        loss = localizer_loss(out, batch["xy"], batch["z"], batch["valid"], sigma=self.sigma)
        if "seg_logits" in out:  # a batch of phantoms has no maps: a zero term, head in graph
            seg = segmentation_loss(out["seg_logits"], batch.get("seg"), UNKNOWN)
            loss["loss"] = loss["loss"] + self.seg_weight * seg["loss"]
            loss["seg_ce"], loss["seg_dice"] = seg["ce"], seg["dice"]
        return loss


def train_localizer(
    cfg: Config,
    samples: Mapping[str, Sequence[LocalizerSample]],
    val_samples: Mapping[str, Sequence[LocalizerSample]],
    runtime: Runtime,
    ckpt_dir: Path | None = None,
    log_fn=None,
    seed: int = 0,
    fold: int | None = None,
) -> dict[str, nn.Module]:
    """Train one stage-1 network per task (tasks without samples are skipped).

    Each net starts from the backbone init, or with ``localizer.init_from`` from that run's
    weights for ``fold`` (:mod:`spinegrade.training.init_from`); a checkpoint still resumes.
    """
    c = cfg.localizer
    nets: dict[str, nn.Module] = {}
    for name in configured_tasks(cfg):
        if not samples.get(name):
            continue
        torch.manual_seed(seed)  # the initial weights too: a rerun gives the same fold
        # The label maps' head only where this net's data have maps: a net of phantoms alone
        # is built as before, its weights and its random draws unchanged.
        seg = c.seg_weight > 0 and any(s.labels is not None for s in samples[name])
        net = start_net(cfg, "localizer", name, fold, seg=seg)
        spec = FitSpec(
            f"localizer_{name}", c.epochs, c.batch_size, c.lr, cfg.optim, c.weight_decay, seed,
            average=cfg.train.weight_average, eval_every=cfg.train.eval_every,
            log_every=cfg.train.log_every,
        )  # fmt: skip
        dataset = LocalizerDataset(
            samples[name], augment=True, zoom=c.zoom, seed=seed, aug=c.augment, fine=c.fine,
            shift_frac=c.zoom_shift,
        )  # fmt: skip
        val = list(val_samples.get(name, []))

        def evaluate(m: nn.Module, v=val) -> dict[str, float]:
            # Each rank decodes its share of the validation stacks; all see the same numbers.
            parts = runtime.gather(
                localizer_hits_errors(m, runtime.shard(v), c.zoom, c.decoder, c.fine)
            )
            return summarize_hits_errors(*(np.concatenate(p) for p in zip(*parts, strict=True)))

        ckpt = ckpt_dir / f"localizer_{name}" if ckpt_dir else None
        loss = _LocalizerLoss(c.sigma, c.seg_weight)
        fit(
            net,
            dataset,
            collate_stacks,
            loss,
            spec,
            runtime,
            ckpt,
            log_fn,
            evaluate if val else None,
        )
        nets[name] = net.eval()
    return nets


# ------------------------------------------------------------------------------ stage-2 training


class _GraderLoss:
    """``step_loss`` for :func:`.engine.fit`: weighted CE (+ any-severe for RSNA's spinal).

    RSNA graders weigh classes by ``loss.class_weights`` (the metric's 1/2/4); another task's
    by its conditions' own class weights, each row scored on its condition's output and grades.
    """

    def __init__(self, cfg: Config, group: str, task: Task = RSNA_2024) -> None:
        self.loss, self.task = cfg.loss, task
        self.any_weight = cfg.loss.any_severe_weight if task.is_rsna and group == "spinal" else 0.0
        self.ordinal_sigma = cfg.loss.ordinal_sigma
        if task.is_rsna:
            if self.ordinal_sigma > 0:
                raise ValueError(
                    "loss.ordinal_sigma is for tasks other than RSNA 2024, whose loss is the "
                    "competition metric's weighted log loss: set loss.ordinal_sigma=0"
                )
            self.class_weights = list(cfg.loss.class_weights)
        else:  # the longest grade list's weights; shorter ones are masked (see select_heads)
            longest = max((task.condition(c) for c in task.group_conditions(group)),
                          key=lambda c: len(c.grades))  # fmt: skip
            self.class_weights = list(longest.class_weights)
            # Which outputs of the group's network grade an ordinal condition.
            self.ordinal_head = torch.tensor(
                [task.condition(h).ordinal for h in task.heads(group)], dtype=torch.bool
            )

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = model(batch["x"], batch["level"])
        if not self.task.is_rsna:  # each row's crop teaches every condition of its bundle
            head, grades = batch["head"], batch["grades"]
            logits = torch.cat(
                [select_heads(logits, head[:, k], grades[:, k]) for k in range(head.shape[1])],
                dim=1,
            )
            if self.ordinal_sigma > 0:
                labels = batch["labels"].reshape(-1)
                ordinal = self.ordinal_head.to(head.device)[head.reshape(-1)]
                q = ordinal_targets(
                    labels, grades.reshape(-1), ordinal, logits.shape[-1], self.ordinal_sigma
                )
                ce = soft_weighted_ce(logits, labels, q, self.class_weights)
                return {"loss": ce, "ce": ce.detach(), "any_severe": ce.new_zeros(())}
        return grading_loss(
            logits, batch["labels"], study_index=batch["study"],
            any_severe_weight=self.any_weight, class_weights=self.class_weights,
            label_smoothing=self.loss.label_smoothing,
        )  # fmt: skip


def grader_stage(group: str, member: int = 0) -> str:
    """A grader's stage name in the fold's log and its checkpoint folder: ``grader_<group>``,
    further members (``train.members``) ``grader_<group>_m<k>``."""
    return f"grader_{group}" + (f"_m{member}" if member else "")


def train_grader(
    cfg: Config,
    group: str,
    train: Sequence[StudyData],
    val: Sequence[StudyData],
    points: Mapping[int, StudyPoints],
    runtime: Runtime,
    ckpt_path: Path | None = None,
    log_fn=None,
    seed: int = 0,
    fold: int | None = None,
    task: Task = RSNA_2024,
    member: int = 0,
) -> nn.Module:
    """Train the stage-2 model of one group (of ``task``) on crops around the (jittered) true
    points; ``member`` > 0 names a further member's stage in the log (``train.members``).

    It starts from the backbone init, or with ``model.init_from`` from that run's grader of
    ``group`` for ``fold`` (:mod:`spinegrade.training.init_from`); a checkpoint still resumes.
    """
    torch.manual_seed(seed)
    model = start_net(cfg, "model", group, fold, task)
    t = cfg.train
    dataset = GraderDataset(train, points, group, cfg.crops, augment=True, seed=seed, task=task)
    if len(dataset) == 0:
        raise ValueError(f"no {group} training crops: check the labels and the cache")
    val_set = GraderDataset(val, points, group, cfg.crops, augment=False, task=task)
    items = max(1, t.batch_size // len(LEVELS))  # an item holds the five levels of a study
    spec = FitSpec(
        grader_stage(group, member), t.epochs, items, t.lr, cfg.optim, seed=seed,
        average=t.weight_average, eval_every=t.eval_every, log_every=t.log_every,
    )  # fmt: skip
    loss = _GraderLoss(cfg, group, task)
    evaluate = (
        (lambda m: _evaluate_grader(m, val_set, loss, runtime, t.eval_batch_size))
        if len(val_set)
        else None
    )
    fit(model, dataset, collate_levels, loss, spec, runtime, ckpt_path, log_fn, evaluate)
    return model.eval()


def _evaluate_grader(
    model, dataset: GraderDataset, loss, runtime: Runtime, batch_rows: int
) -> dict:
    """Validation loss on crops at the true points (no jitter); each rank takes its share of the
    items and the label-weighted sums are combined."""
    from spinegrade.util.runtime import to_device

    per = max(1, batch_rows // len(LEVELS))
    mine = runtime.shard(range(len(dataset)))
    total, weight = 0.0, 0
    for i in range(0, len(mine), per):
        batch = to_device(collate_levels([dataset[k] for k in mine[i : i + per]]), runtime)
        with runtime.autocast():
            parts = loss(model, batch)
        n = int((batch["labels"] >= 0).sum())
        total, weight = total + float(parts["loss"]) * n, weight + n
    sums = runtime.gather((total, weight), "validating the grader")
    return {"loss": sum(t for t, _ in sums) / max(sum(w for _, w in sums), 1)}
