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

import contextlib
import datetime
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from spinegrade.atomic import atomic_path, crash_point, write_json
from spinegrade.config import OptimConfig, TrainConfig
from spinegrade.progress import progress_bar

CKPT_FORMAT = "spinegrade-checkpoint/1"
T = TypeVar("T")


# ------------------------------------------------------------------------------------ runtime


@dataclass
class Runtime:
    """Where and how tensors run: device, precision, distributed rank."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # None = full precision
    channels_last: bool = False
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files and runs out-of-fold prediction."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision on CUDA (bf16/fp16); a no-op on CPU or with ``amp: false``."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self, where: str = "a barrier") -> None:
        if self.distributed:
            with collective(self, where):
                torch.distributed.barrier()

    def close(self) -> None:
        """Leave the process group. Every rank must, before it exits: gloo's worker threads
        outliving the interpreter abort the process (SIGABRT), failing a finished run."""
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items`` (every ``world_size``-th from ``rank``): each item is
        handled by exactly one rank."""
        return list(items[self.rank :: self.world_size])

    def gather(self, obj: Any, where: str = "gathering results") -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` alone."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with collective(self, where):
            torch.distributed.all_gather_object(out, obj)
        return out

    def describe(self) -> dict[str, Any]:
        """How this run trains, for log.jsonl and metrics.json."""
        amp = None if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"world_size": self.world_size, "device": str(self.device), "device_name": name,
                "amp": amp, "channels_last": self.channels_last}  # fmt: skip


class DistributedFailure(RuntimeError):
    """Another rank died, hung or failed: this rank stops instead of waiting for ever."""


# Collective errors come from gloo/NCCL as plain RuntimeErrors (DistBackendError on newer torch);
# these fragments tell them from a model's own RuntimeError.
_COLLECTIVE_HINTS = ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket")


@contextlib.contextmanager
def collective(runtime: Runtime, where: str) -> Iterator[None]:
    """Turn a failed collective (a dead or stuck rank) into a clear :class:`DistributedFailure`."""
    if not runtime.distributed:
        yield
        return
    try:
        yield
    except DistributedFailure:
        raise
    except RuntimeError as err:
        dist_error = getattr(torch.distributed, "DistError", ())
        text = str(err).lower()
        if not (isinstance(err, dist_error) or any(h in text for h in _COLLECTIVE_HINTS)):
            raise
        raise DistributedFailure(
            f"rank {runtime.rank}/{runtime.world_size}: lost the other ranks while {where} "
            f"(a rank died or stalled beyond train.ddp_timeout_s); see the other ranks' output "
            f"for the first error, fix it and rerun: finished stages resume. ({err})"
        ) from err


def fault_point(point: str, runtime: Runtime) -> None:
    """``SPINEGRADE_TEST_DIE=point:rank`` kills that rank at that point (tests of lost ranks)."""
    want = os.environ.get("SPINEGRADE_TEST_DIE", "")
    if want and want == f"{point}:{runtime.rank}":
        os._exit(17)


def setup_runtime(cfg: TrainConfig, threads: int | None = None) -> Runtime:
    """Pick the device and precision, and join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.accelerator
    if want not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.accelerator must be auto, cpu or cuda, got {want!r}")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.accelerator=cuda but no CUDA device is visible; use auto or cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if cfg.strategy not in ("auto", "ddp"):
        raise ValueError(f"train.strategy must be auto or ddp, got {cfg.strategy!r}")
    if cfg.strategy == "ddp" and "WORLD_SIZE" not in os.environ:
        # One process per GPU: torchrun starts them and sets WORLD_SIZE, RANK and LOCAL_RANK.
        raise RuntimeError(
            "train.strategy=ddp needs one process per GPU, started by torchrun: launch with "
            "`torchrun --nproc_per_node N -m spinegrade.cli train ...` (N = number of GPUs)"
        )
    if world > 1 and not torch.distributed.is_initialized():
        # The timeout bounds every collective: a dead rank fails the others, never hangs them.
        timeout = datetime.timedelta(seconds=float(cfg.ddp_timeout_s))
        torch.distributed.init_process_group(
            backend="nccl" if use_cuda else "gloo", timeout=timeout
        )
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        amp = None
        if cfg.amp:
            amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        device, amp = torch.device("cpu"), None
        # Respect OMP_NUM_THREADS (torchrun sets it; a shared machine may want 1), else 2 cores:
        # small CPU models gain little from more threads and oversubscription costs a lot.
        env = os.environ.get("OMP_NUM_THREADS", "")
        default = int(env) if env.isdigit() else min(os.cpu_count() or 1, 2 if world == 1 else 1)
        torch.set_num_threads(threads or max(1, default))
    workers = cfg.num_workers if use_cuda else 0  # CPU: workers would steal the compute threads
    return Runtime(device, amp, cfg.channels_last and use_cuda, workers, rank, world, local_rank)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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


# ------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    average: WeightAverage | None = None,
) -> None:
    """Model, optimiser (and weight-average) tensors as safetensors, the rest as JSON; atomic."""
    tensors = {f"model.{k}": _cpu(v) for k, v in unwrap(model).state_dict().items()}
    if average is not None:
        tensors.update({f"average.{k}": _cpu(v) for k, v in average.state.items()})
        state = {**state, "average_steps": average.steps}
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = _cpu(value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    meta = {"format": CKPT_FORMAT, "param_groups": opt["param_groups"], "scalars": scalars, **state}
    # The JSON file is the commit point: it names the tensor file it goes with (one per epoch), so
    # a kill between the two writes leaves the previous epoch's pair intact and in use.
    tensor_path = path.with_name(f"{path.stem}.e{state.get('epoch', 0)}.safetensors")
    with atomic_path(tensor_path) as tmp:
        save_file(tensors, str(tmp))
    crash_point(f"checkpoint_write:{path.stem}")
    write_json(path.with_suffix(".json"), {**meta, "tensors": tensor_path.name}, indent=None)
    for old in path.parent.glob(f"{path.stem}.e*.safetensors"):
        if old.name != tensor_path.name:
            old.unlink(missing_ok=True)


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous()


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    average: WeightAverage | None = None,
) -> dict | None:
    """Restore a checkpoint written by :func:`save_checkpoint`; None when there is none."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return None
    meta = json.loads(json_path.read_text())
    if meta.get("format") != CKPT_FORMAT:
        raise ValueError(
            f"{json_path}: not a spinegrade checkpoint; delete it to start the stage over"
        )
    # Checkpoints written before the JSON named its tensors sit at PATH.safetensors.
    tensor_path = path.parent / meta.get("tensors", path.with_suffix(".safetensors").name)
    if not tensor_path.is_file():
        raise ValueError(
            f"{json_path} names {tensor_path.name}, which is missing; delete {path.parent} to "
            "start the stage over"
        )
    tensors = load_file(str(tensor_path))
    unwrap(model).load_state_dict(_with_prefix(tensors, "model."))
    if average is not None and "average_steps" in meta:
        average.load(_with_prefix(tensors, "average."), int(meta["average_steps"]))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def _with_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


class WeightAverage:
    """Exponential moving average of a model's weights and buffers.

    With a few hundred steps on a few dozen studies, the weights of the last step are one noisy
    draw; their running average predicts more steadily (the same idea as SWA / timm's ModelEma).
    The decay ramps up over the first steps so the random initial weights fade quickly.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay, self.steps = decay, 0
        self.state = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.steps += 1
        d = min(self.decay, (1 + self.steps) / (10 + self.steps))
        for k, v in unwrap(model).state_dict().items():
            if v.dtype.is_floating_point:
                self.state[k].mul_(d).add_(v.detach(), alpha=1 - d)
            else:
                self.state[k].copy_(v)

    def load(self, state: dict[str, torch.Tensor], steps: int) -> None:
        for k, v in state.items():
            self.state[k].copy_(v)
        self.steps = steps

    def copy_to(self, model: nn.Module) -> None:
        unwrap(model).load_state_dict(self.state)


# ------------------------------------------------------------------------------------ the loop


class EpochDataset(Dataset):
    """A dataset whose augmentation depends on (seed, epoch, index): resumable and worker-safe."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


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
    loader, _ = _loader(dataset, collate, spec, runtime)
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
        h.update(_cpu(p).reshape(-1).view(torch.uint8).numpy().tobytes())
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


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Rows one rank takes a step: the configured (global) batch split over the ranks.

    With W dividing the batch, the global batch and the steps an epoch are those of one process;
    otherwise the global batch is ``W * (batch // W)`` (at least one row a rank).
    """
    return max(1, batch_size // max(1, world_size))


def _loader(dataset: EpochDataset, collate, spec: FitSpec, runtime: Runtime):
    """This rank's batches; ``len(loader)`` = optimiser steps an epoch, the same for W ranks as
    for one process (see :class:`_GlobalBatches`)."""
    batches = _GlobalBatches(dataset, spec.seed, spec.batch_size, runtime.rank, runtime.world_size)
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        collate_fn=collate,
        num_workers=runtime.num_workers,
        pin_memory=runtime.device.type == "cuda",
    )
    return loader, batches


class _GlobalBatches(Sampler[list[int]]):
    """This rank's rows of each global batch of the one-process order (a batch sampler).

    The epoch's order is :class:`_EpochRandomSampler`'s (a function of seed and epoch); it is cut
    into global batches of ``W * (batch // W)`` rows, the last incomplete one dropped (a single
    partial batch when the whole set is smaller than a batch), and rank r takes rows
    ``[r * b, (r + 1) * b)`` of each, b = ``batch // W``. So W ranks make the same optimiser
    steps over the same samples, with the same global batches, as one process: nothing is padded
    or repeated, and DDP's gradient average over the ranks is the step of the whole batch (up to
    losses that normalise per batch, e.g. class-weighted means).
    """

    def __init__(self, dataset: EpochDataset, seed: int, batch: int, rank: int, world: int):
        self.order = _EpochRandomSampler(dataset, seed)
        self.rank, self.world = rank, world
        self.per_rank = rank_batch_size(batch, world)
        self.batch = self.per_rank * world

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch if n > self.batch else 1

    def __iter__(self) -> Iterator[list[int]]:
        perm = list(self.order)
        if len(perm) <= self.batch:  # one partial step: spread the rows, each rank at least one
            part = perm[self.rank :: self.world] or perm[:1]
            yield part
            return
        b = self.per_rank
        for k in range(len(self)):
            start = k * self.batch + self.rank * b
            yield perm[start : start + b]


class _EpochRandomSampler(Sampler[int]):
    """A random order that depends only on (seed, epoch): a resumed epoch sees the same batches."""

    def __init__(self, dataset: EpochDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.dataset.epoch)
        return iter(torch.randperm(len(self.dataset), generator=gen).tolist())


def to_device(batch: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """Move the tensors of a batch to the device.

    Inputs stay as they are even with ``channels_last``: axis 1 of a (B, S, H, W) batch holds
    slices, not channels, and the models fold it into the batch (grader) or into neighbour
    channels (localiser) before the first convolution. Channels-last is a property of the conv
    weights (:func:`fit`), whose outputs then carry it through the backbone.
    """
    return {
        k: v.to(runtime.device, non_blocking=True) if torch.is_tensor(v) else v
        for k, v in batch.items()
    }


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
