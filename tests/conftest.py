"""Test-wide settings, applied before any test module imports torch."""

import os

# Offline by default: timm must never wait on the hub in tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# With OpenMP's default busy-wait, torch threads spin when the two cores are shared (pytest plus
# forkserver workers), which made the suite ~6x slower here; passive waiting costs nothing alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
