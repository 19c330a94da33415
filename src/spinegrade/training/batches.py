"""Batches for one process or many: each DDP rank takes its share of the one-process order."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Sampler

from spinegrade.data.epoch import EpochDataset
from spinegrade.util.runtime import Runtime

if TYPE_CHECKING:  # the loop's spec; the loop imports this module
    from spinegrade.training.engine import FitSpec


def rank_batch_size(batch_size: int, world_size: int) -> int:
    """Rows one rank takes a step: the configured (global) batch split over the ranks.

    With W dividing the batch, the global batch and the steps an epoch are those of one process;
    otherwise the global batch is ``W * (batch // W)`` (at least one row a rank).
    """
    return max(1, batch_size // max(1, world_size))


def make_loader(dataset: EpochDataset, collate, spec: FitSpec, runtime: Runtime):
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
