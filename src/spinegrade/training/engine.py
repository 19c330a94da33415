"""The training loop shared by stage 1 and stage 2: devices, mixed precision, DDP, checkpoints.

One plain PyTorch loop (no Lightning) that works the same on 2 CPU cores and on GPUs:

* device from ``train.accelerator`` (auto | cpu | cuda); bf16 autocast on CUDA when supported
  (fp16 with a gradient scaler otherwise), channels-last memory format, DataLoader workers;
* multi-GPU with DistributedDataParallel when launched by ``torchrun`` (``WORLD_SIZE`` > 1; the
  world size is torchrun's, never a config key; ``train.strategy: ddp`` makes a launch without
  torchrun an error); every rank trains on its share of each batch and only rank 0 writes
  files. The configured batch is the *global* batch: each of W ranks takes its ``batch // W``
  rows of every batch of the one-process order (:class:`_GlobalBatches`: nothing padded or
  repeated, the incomplete last batch dropped as one process does), so W processes make the
  optimiser steps of one process over the same batches when W divides the batch. A collective
  that waits longer than ``train.ddp_timeout_s`` (a rank died or hangs) fails with
  :class:`DistributedFailure` instead of hanging;
* a checkpoint after every epoch (``.safetensors`` for model and optimiser tensors, ``.json`` for
  the epoch, the optimiser's hyper-parameters and the log so far; the JSON, written last, commits
  the pair), so an interrupted fold resumes where it stopped. The learning-rate schedule is a
  pure function of the step, and augmentation randomness a pure function of (seed, epoch,
  sample), so a resumed run continues identically.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from spinegrade.config import OptimConfig
from spinegrade.data.epoch import EpochDataset
from spinegrade.training.batches import make_loader
from spinegrade.training.checkpoints import WeightAverage, load_checkpoint, save_checkpoint
from spinegrade.training.optim import lr_at, make_optimizer, set_lr
from spinegrade.util.atomic import crash_point
from spinegrade.util.progress import progress_bar
from spinegrade.util.runtime import Runtime, collective, fault_point, to_device, unwrap


@dataclass
class FitSpec:
    """What :func:`fit` trains and how."""

    name: str  # stage name in logs and checkpoint file names, e.g. "grader_spinal"
    epochs: int
    batch_size: int
    lr: float
    optim: OptimConfig
    weight_decay: float | None = None
    seed: int = 0
    average: float = 0.0  # horizon of the weight average kept, as a fraction of all steps (0: off)
    eval_every: int = 1  # run ``evaluate`` after every n-th epoch and after the last
    log_every: int = 0  # also log a step line every n optimiser steps (0: epoch lines only)


def fit(
    model: nn.Module,
    dataset: EpochDataset,
    collate: Callable[[list], dict[str, torch.Tensor]],
    step_loss: Callable[[nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    spec: FitSpec,
    runtime: Runtime,
    ckpt_path: Path | None = None,
    log: Callable[[dict], None] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> list[dict]:
    """Train ``model`` in place for ``spec.epochs``; resume from ``ckpt_path`` if it exists.

    ``step_loss(model, batch)`` returns a dict with a differentiable ``loss`` (other entries are
    logged); ``evaluate(model)`` (every rank, after every ``spec.eval_every``-th epoch and the
    last; under DDP it grades its :meth:`Runtime.shard` and combines with :meth:`Runtime.gather`)
    returns validation numbers (logged, never used to pick weights), measured
    on the weights that will be kept (the weight average when ``spec.average`` > 0).
    ``log`` (rank 0) receives every epoch record and, with ``spec.log_every`` > 0, a step record
    every ``log_every`` optimiser steps (see :class:`_Stepper`). Returns the per-epoch records,
    each with ``steps`` (optimiser steps of the epoch), ``world_size`` and ``param_sha`` (every
    rank's :func:`param_digest` after the epoch, in rank order).
    """
    model.to(runtime.device)
    if runtime.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, spec.lr, spec.optim, spec.weight_decay)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a checkpoint resets them
    loader, _ = make_loader(dataset, collate, spec, runtime)
    average = None
    if spec.average > 0:  # decay from the horizon: averages ~ the last `average` of the steps
        horizon = max(1.0, spec.average * spec.epochs * len(loader))
        average = WeightAverage(model, 1.0 - 1.0 / horizon)
    history: list[dict] = []
    start = 0
    meta = load_checkpoint(ckpt_path, model, optimizer, average) if ckpt_path else None
    if meta is not None:
        start, history = int(meta["epoch"]), list(meta.get("history", []))
    train_model = model
    if runtime.distributed:
        ids = [runtime.local_rank] if runtime.device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    scaler = torch.amp.GradScaler("cuda", enabled=runtime.amp_dtype == torch.float16)
    for epoch in range(start, spec.epochs):
        dataset.set_epoch(epoch)  # the batch order follows the dataset's epoch
        torch.manual_seed(spec.seed * 1000 + epoch)
        step = _Stepper(
            train_model, step_loss, optimizer, base_lrs, scaler, spec, runtime, average, log
        )
        with collective(runtime, f"training {spec.name} epoch {epoch + 1}"):
            record = step.epoch(loader, epoch)
        record["world_size"] = runtime.world_size
        # DDP keeps every rank's replica identical; the log shows it (one digest per rank).
        record["param_sha"] = runtime.gather(param_digest(model), f"comparing {spec.name} ranks")
        fault_point(f"{spec.name}:epoch", runtime)
        due = (epoch + 1) % max(1, spec.eval_every) == 0 or epoch + 1 == spec.epochs
        if evaluate is not None and due:
            with collective(runtime, f"validating {spec.name}"):
                record.update(_evaluate(model, average, evaluate))
        history.append(record)
        if runtime.is_main:  # checkpoint first: a log consumer may stop the run
            if ckpt_path is not None:
                state = {"epoch": epoch + 1, "history": history}
                save_checkpoint(ckpt_path, model, optimizer, state, average)
                crash_point(f"fit_epoch:{spec.name}")
            if log is not None:
                log(record)
        runtime.barrier(f"the end of {spec.name} epoch {epoch + 1}")
    if average is not None:
        average.copy_to(model)
    return history


def param_digest(model: nn.Module) -> str:
    """A short sha256 of the model's parameters (names and bytes). Buffers are left out: under
    DDP each rank's BatchNorm statistics follow its own batches."""
    h = hashlib.sha256()
    for name, p in unwrap(model).named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _evaluate(model: nn.Module, average: WeightAverage | None, evaluate) -> dict[str, float]:
    """Validation numbers of the weights that will be kept (the average when there is one)."""
    live = None
    if average is not None:
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        average.copy_to(model)
    model.eval()
    with torch.no_grad():
        out = {f"val_{k}": round(v, 5) for k, v in evaluate(model).items()}
    if live is not None:
        model.load_state_dict(live)
    return out


@dataclass
class _Stepper:
    """One epoch of optimisation steps (learning-rate schedule, AMP, clipping, averaging).

    With ``spec.log_every`` = n > 0, rank 0 also logs a step record every n optimiser steps:
    ``{"stage", "epoch", "step", "loss", "lr", "samples_per_s"}`` where ``step`` counts from the
    start of the stage, ``loss`` and ``samples_per_s`` are over the last n steps and ``lr`` is the
    head's (un-scaled) learning rate of the last step. On long GPU epochs this shows progress and
    divergence long before the epoch record.
    """

    model: nn.Module
    step_loss: Callable
    optimizer: torch.optim.Optimizer
    base_lrs: list[float]
    scaler: torch.amp.GradScaler
    spec: FitSpec
    runtime: Runtime
    average: WeightAverage | None
    log: Callable[[dict], None] | None = None

    def epoch(self, loader, epoch: int) -> dict:
        t0, sums, n, rows = time.perf_counter(), {}, 0, 0
        total = self.spec.epochs * len(loader)
        window = _Window(t0)
        self.model.train()
        desc = f"{self.spec.name} epoch {epoch + 1}/{self.spec.epochs}"
        show = self.runtime.is_main
        for i, batch in enumerate(progress_bar(loader, desc=desc, enabled=show, leave=False)):
            step = epoch * len(loader) + i
            set_lr(self.optimizer, self.base_lrs, step, total, self.spec.optim)
            parts = self.step(batch)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
            batch_rows = len(next(v for v in batch.values() if torch.is_tensor(v)))
            rows += batch_rows
            window.add(parts["loss"], batch_rows)
            every = self.spec.log_every
            if every > 0 and (step + 1) % every == 0 and self.log is not None and show:
                lr = lr_at(step, total, self.spec.lr, self.spec.optim)
                self.log({"stage": self.spec.name, "epoch": epoch + 1, "step": step + 1,
                          **window.flush(), "lr": lr})  # fmt: skip
        elapsed = time.perf_counter() - t0
        record = {"stage": self.spec.name, "epoch": epoch + 1, "steps": n,
                  "time_s": round(elapsed, 2)}  # fmt: skip
        record.update({f"train_{k}": round(v / max(n, 1), 5) for k, v in sums.items()})
        # Rows of the batch's first tensor: crops for graders, stacks for localisers.
        record["samples_per_s"] = round(rows / max(elapsed, 1e-9), 2)
        return record

    def step(self, batch: dict) -> dict[str, float]:
        batch = to_device(batch, self.runtime)
        with self.runtime.autocast():
            parts = self.step_loss(self.model, batch)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{self.spec.name}: loss became {float(loss)}; lower the learning rate or "
                "disable amp"
            )
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.spec.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.spec.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.average is not None:
            self.average.update(self.model)
        return {k: float(v.detach()) for k, v in parts.items()}


class _Window:
    """Mean loss and throughput over the steps since the last step log line."""

    def __init__(self, t0: float) -> None:
        self.t0, self.loss, self.steps, self.rows = t0, 0.0, 0, 0

    def add(self, loss: float, rows: int) -> None:
        self.loss, self.steps, self.rows = self.loss + loss, self.steps + 1, self.rows + rows

    def flush(self) -> dict[str, float]:
        now = time.perf_counter()
        out = {
            "loss": round(self.loss / max(self.steps, 1), 5),
            "samples_per_s": round(self.rows / max(now - self.t0, 1e-9), 2),
        }
        self.__init__(now)
        return out


class JsonlLog:
    """Append JSON lines to a fold's ``log.jsonl``: one per stage and epoch, plus step lines
    (records with a ``step`` key) every ``train.log_every`` optimiser steps."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
