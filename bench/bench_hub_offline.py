"""How long a pretrained-weights request takes to fail on a machine without internet access.

Three ways, each in a fresh interpreter with an empty hub cache (HF_HOME in a temp folder):

* ``timm``: plain ``timm.create_model(NAME, pretrained=True)``, HF_HUB_OFFLINE unset
  (huggingface_hub retries the unreachable host);
* ``timm+HF_HUB_OFFLINE=1``: the same in huggingface_hub's offline mode (cache only);
* ``spinegrade``: :func:`spinegrade.models.weights.create_backbone` with HF_HUB_OFFLINE unset
  (one bounded connection check, then the cache only and a clear error).

Prints seconds from the call to the error (imports not counted). Usage::

    python bench/bench_hub_offline.py [--backbone efficientnet_b0]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
name, how = sys.argv[1], sys.argv[2]
import timm
from spinegrade.models.weights import create_backbone
t0 = time.perf_counter()
try:
    if how == "spinegrade":
        create_backbone(name, pretrained=True)
    else:
        timm.create_model(name, pretrained=True, features_only=True, in_chans=1)
    print("loaded", time.perf_counter() - t0)
except Exception as err:
    print(f"{time.perf_counter() - t0:.2f} {type(err).__name__}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b0")
    args = parser.parse_args()
    cases = [("timm", {}), ("timm+HF_HUB_OFFLINE=1", {"HF_HUB_OFFLINE": "1"}), ("spinegrade", {})]
    print(f"{'how':<24}{'seconds to the error':>22}  error")
    for label, extra in cases:
        with tempfile.TemporaryDirectory() as home:
            env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
            env.update(extra, HF_HOME=home)
            how = "spinegrade" if label == "spinegrade" else "timm"
            out = subprocess.run(
                [sys.executable, "-c", CHILD, args.backbone, how],
                env=env, capture_output=True, text=True, check=True,
            ).stdout.split()  # fmt: skip
            print(f"{label:<24}{out[0]:>22}  {' '.join(out[1:])}")


if __name__ == "__main__":
    main()
