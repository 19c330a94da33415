"""Where tensors live and how processes cooperate: device, threads, the DDP process group.

A collective that waits longer than ``train.ddp_timeout_s`` (a rank died or hangs) fails with
:class:`DistributedFailure` instead of hanging. Only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

from spinegrade.config import TrainConfig

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
    # Channels-last convolution kernels on CPU too: oneDNN's fast layout trains the quick
    # recipe's localiser ~45% and its graders ~30% faster a step (BENCHMARKS.md, "Training").
    return Runtime(device, amp, cfg.channels_last, workers, rank, world, local_rank)


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside a DDP wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


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
