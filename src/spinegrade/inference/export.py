"""``spinegrade export RUN_DIR --format onnx``: every fold's networks as ONNX files, in the run.

Each fold's localisers and graders get ``NAME.onnx`` and ``NAME.onnx.json`` beside their
``NAME.safetensors`` (see :mod:`spinegrade.models.onnx`), each checked against torch at export.
Prediction then runs them in ONNX Runtime (``--engine auto|onnx``), and refuses any whose weights
changed after the export.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from spinegrade.inference.ensemble import run_folds
from spinegrade.inference.run_folder import fold_dir, load_run_config
from spinegrade.task import dataset_task

log = logging.getLogger(__name__)

FORMATS = ("onnx",)


@dataclass
class ExportedNet:
    """One network's export: its file and the check against torch."""

    fold: int
    path: Path
    max_abs_prob_diff: float


def fold_networks(fold: Path) -> list[Path]:
    """A trained fold's network weights (``*.safetensors``): localisers first, then graders."""
    geometry = json.loads((fold / "localizer_geometry.json").read_text())
    nets = [fold / f"localizer_{name}.safetensors" for name in geometry.get("tasks", [])]
    if "tasks" not in geometry:  # runs older than the list: the nets present are the nets
        nets = sorted(fold.glob("localizer_*.safetensors"))
    return nets + sorted(fold.glob("grader_*.safetensors"))


def export_run(
    run_dir: Path | str,
    fmt: str = "onnx",
    folds: list[int] | None = None,
    on_net: Callable[[ExportedNet], None] | None = None,
) -> list[ExportedNet]:
    """Export every network of the run's complete folds (or ``folds``) to ``fmt``.

    Every network is checked against torch as it is written (:func:`.models.onnx.export_network`;
    the largest absolute probability difference is in the result and in each sidecar); the first
    that fails stops the export with :class:`~spinegrade.models.onnx.OnnxError`, the networks
    before it kept. ``on_net`` is told about each network as it is done (the CLI's lines).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: spinegrade exports {', '.join(FORMATS)}")
    from spinegrade.models.onnx import EXTRA_HINT, export_network

    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401  (torch's exporter translates with it)
    except ImportError as err:
        raise ValueError(f"exporting to ONNX needs {err.name}: {EXTRA_HINT}") from err
    run_dir = Path(run_dir)
    chosen = run_folds(run_dir, folds)
    cfg = load_run_config(run_dir)
    task = dataset_task(run_dir).name
    done: list[ExportedNet] = []
    for k in chosen:
        folder = fold_dir(run_dir, k)
        geometry = json.loads((folder / "localizer_geometry.json").read_text())
        for weights in fold_networks(folder):
            if weights.name.startswith("localizer_"):  # the looks' sizes it was trained with
                size, slices = int(geometry["image_size"]), int(geometry["max_slices"])
            else:
                size, slices = cfg.crops.size, 0
            sidecar = export_network(weights, size, slices, task=task)
            net = ExportedNet(
                k, weights.with_suffix(".onnx"), sidecar["check"]["max_abs_prob_diff"]
            )
            log.debug("%s: max |p_onnx - p_torch| = %.2e", net.path, net.max_abs_prob_diff)
            done.append(net)
            if on_net is not None:
                on_net(net)
    return done
