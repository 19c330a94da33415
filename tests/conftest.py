"""Test-wide settings, applied before any test module imports torch."""

import os

# Offline by default: timm must never wait on the hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# With OpenMP's default busy-wait, torch threads spin when the two cores are shared (pytest plus
# forkserver workers), which made the suite ~6x slower here; passive waiting costs nothing alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    """A phantom dataset (4 train + 3 test studies) and a tiny 2-fold run trained on it, once per
    session: the prediction and service tests check plumbing, not accuracy. Read-only for users."""
    from spinegrade.config import load_config
    from spinegrade.phantom import generate_dataset
    from spinegrade.preprocessing.build import preprocess_dataset
    from spinegrade.training.cv import cross_validate
    from tiny_config import TINY_RUN

    root = tmp_path_factory.mktemp("tiny_trained")
    data = root / "data"
    generate_dataset(data, n_train=4, n_test=3, seed=3, workers=1)
    cfg = load_config("quick", TINY_RUN)
    preprocess_dataset(
        data, root / "cache", "train", size=cfg.data.cache_size, mm=cfg.data.cache_mm,
        progress=False,
    )  # fmt: skip
    cross_validate(data, root / "cache", root / "run", cfg, progress=False)
    return data, root / "run"
