"""The dataset base class whose augmentation is a pure function of (seed, epoch, index)."""

from __future__ import annotations

from torch.utils.data import Dataset

# ------------------------------------------------------------------------------------ the loop


class EpochDataset(Dataset):
    """A dataset whose augmentation depends on (seed, epoch, index): resumable and worker-safe."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
