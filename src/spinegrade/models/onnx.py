"""A trained network as an ONNX file, and ONNX Runtime running it (the ``[onnx]`` extra).

Hospitals' IT teams deploy models as ONNX on CPU servers. :func:`export_network` writes a
network's ``NAME.onnx`` beside its ``NAME.safetensors`` with a sidecar ``NAME.onnx.json``: the
weights sidecar's build spec, backbone origin and metadata (task, fold, group), the input sizes, the
opset, and the SHA-256 of the safetensors file it came from. It is checked against torch on the
same inputs before it is kept: the largest absolute probability difference is recorded in the
sidecar, and the export fails above :data:`TOLERANCE`.

* Graders: inputs ``crops`` (B, S, H, W) float32 and ``level`` (B,) int64, output ``logits``
  (B, T, K), the grader's own output: softmax and the task's columns stay in
  :func:`spinegrade.inference.fold_models.column_probs`, shared by both engines.
* Localisers: input ``volumes`` (B, S, H, W), output ``heatmaps`` (B, T, S, h, w), the joint
  logits the looks decode (:meth:`.LevelLocalizer.heatmaps`); the slice count is dynamic (a stack's
  slices, or the canal's close look on five).

:func:`load_onnx` refuses a file whose sidecar names other weights than the safetensors file beside
it (weights retrained or replaced after the export): prediction must never grade with networks
other than the run's. :class:`OnnxGrader` and :class:`OnnxLocalizer` are called like the torch
modules they came from (torch tensors in and out), so the prediction code is one for both engines.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spinegrade.models.weights import WeightsError, read_sidecar, sha256, weights_paths
from spinegrade.task import LEVELS
from spinegrade.util.atomic import atomic_path, write_json

ONNX_FORMAT = "spinegrade-onnx/1"
# Opset 18: what torch's exporter translates to natively, and what ONNX Runtime has run since
# 1.14 (2023), so a hospital's older runtime still loads the files.
OPSET = 18
# The largest absolute probability difference an export may show against torch (float32 passes
# differ by ~1e-7 from summation order; a wrong export by orders of magnitude more).
TOLERANCE = 1e-4
EXTRA_HINT = "install the extra: pip install 'spinegrade[onnx]'"


class OnnxError(ValueError):
    """An ONNX file that cannot be made, is missing, stale or does not match its weights."""


def onnx_paths(weights: str | Path) -> tuple[Path, Path]:
    """(``NAME.onnx``, its sidecar ``NAME.onnx.json``) beside ``NAME.safetensors``."""
    tensor_path, _ = weights_paths(weights)
    onnx_path = tensor_path.with_suffix(".onnx")
    return onnx_path, onnx_path.with_name(onnx_path.name + ".json")


def runtime_available() -> bool:
    """Whether ONNX Runtime can be imported (the ``[onnx]`` extra is installed)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


# ----------------------------------------------------------------------------------- export


class _GraderGraph(nn.Module):
    """The grader as exported: crops and levels -> logits (eval mode, no input checks)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, crops: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self.net(crops, level)


class _LocalizerGraph(nn.Module):
    """The localiser as exported: volumes -> the joint heatmap logits the looks decode."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.net.heatmaps(volumes)


def _check_inputs(kind: str, shape: Mapping[str, int]) -> list[dict[str, np.ndarray]]:
    """Seeded inputs for the check: values of the nets' real inputs (0..1), batches of two sizes
    (the batch axis is dynamic), every disc level, and for a localiser two slice counts (a whole
    stack and the canal's five-slice close look; the slice axis is dynamic too)."""
    rng = np.random.default_rng(0)
    size, slices = shape["size"], shape["slices"]
    if kind == "grader":
        return [
            {"crops": rng.random((n, slices, size, size), dtype=np.float32),
             "level": np.arange(n, dtype=np.int64) % len(LEVELS)}
            for n in (len(LEVELS), 2)
        ]  # fmt: skip
    return [
        {"volumes": rng.random((2, slices, size, size), dtype=np.float32)},
        {"volumes": rng.random((3, min(5, slices), size, size), dtype=np.float32)},
    ]


def _probabilities(kind: str, out: np.ndarray) -> np.ndarray:
    """What prediction reads from an output: grade probabilities (softmax over grades) or, for a
    localiser, each target's distribution over (slice, y, x) (softmax over the whole heatmap)."""
    x = out.astype(np.float64)
    if kind == "localizer":
        x = x.reshape(*x.shape[:2], -1)
    x = np.exp(x - x.max(-1, keepdims=True))
    return x / x.sum(-1, keepdims=True)


def export_network(
    weights: str | Path,
    size: int,
    max_slices: int = 0,
    task: str = "",
    tolerance: float = TOLERANCE,
) -> dict[str, Any]:
    """Export the network of ``weights`` (``NAME.safetensors``) to ``NAME.onnx``; its sidecar.

    ``size``: the input's height and width (a grader's crops, a localiser's looks);
    ``max_slices``: a localiser's most slices a look (a grader's slice count is in its spec);
    ``task``: the name of the task the run grades, recorded. The file is written to a temporary
    name, checked against torch there (:func:`_check_inputs`; the largest absolute probability
    difference must be at most ``tolerance``), then renamed into place; the sidecar, written last,
    commits the pair (as for the weights). Raises :class:`OnnxError` when the check fails, leaving
    no ONNX file behind.
    """
    from spinegrade.models.registry import load_model

    tensor_path, _ = weights_paths(weights)
    onnx_path, sidecar_path = onnx_paths(tensor_path)
    source = read_sidecar(tensor_path)
    net, _ = load_model(tensor_path, device="cpu")
    kind = source["spec"]["kind"]
    slices = int(net.in_slices) if kind == "grader" else int(max_slices)
    shape = {"size": int(size), "slices": slices}
    checks = _check_inputs(kind, shape)
    sidecar_path.unlink(missing_ok=True)  # the pair is incomplete from here until the end
    with atomic_path(onnx_path) as tmp:
        _export_graph(kind, net, checks[0], tmp)
        diff = _largest_difference(kind, net, tmp, checks)
        if not diff <= tolerance:  # also NaN
            raise OnnxError(
                f"{onnx_path.name}: ONNX Runtime and torch differ by {diff:.2e} in probability "
                f"(tolerance {tolerance:.0e}); the ONNX file was not kept. Predict with "
                "--engine torch"
            )
    sidecar = {
        "format": ONNX_FORMAT,
        "spec": source.get("spec"),
        "init": source.get("init", {"source": "unknown"}),
        "meta": source.get("meta", {}),
        "task": task,
        "inputs": _input_shapes(kind, shape),
        "opset": OPSET,
        "source": {"file": tensor_path.name, "sha256": sha256(tensor_path)},
        "onnx_sha256": sha256(onnx_path),
        "check": {
            "max_abs_prob_diff": float(diff),
            "tolerance": tolerance,
            "inputs": "seeded uniform 0..1, " + ", ".join(
                "x".join(str(d) for d in v.shape) for c in checks for v in c.values() if v.ndim > 1
            ),
        },
        "exported_with": {"torch": torch.__version__, "onnxruntime": runtime_version()},
    }  # fmt: skip
    write_json(sidecar_path, sidecar, indent=2)
    return sidecar


def _input_shapes(kind: str, shape: Mapping[str, int]) -> dict[str, Any]:
    """Input names and shapes of the exported graph (``batch``, ``slices``: dynamic axes)."""
    size = shape["size"]
    if kind == "grader":
        return {"crops": ["batch", shape["slices"], size, size], "level": ["batch"]}
    return {"volumes": ["batch", "slices", size, size], "max_slices": shape["slices"]}


def _export_graph(kind: str, net: nn.Module, example: dict[str, np.ndarray], path: Path) -> None:
    """torch.export -> ONNX (torch's dynamo exporter), batch (and slice) axes dynamic."""
    import warnings

    from torch.export import Dim

    args = tuple(torch.from_numpy(v) for v in example.values())
    batch = Dim("batch", min=1, max=1 << 16)
    if kind == "grader":
        graph: nn.Module = _GraderGraph(net)
        shapes: tuple = ({0: batch}, {0: batch})
    else:
        graph = _LocalizerGraph(net)
        shapes = ({0: batch, 1: Dim("slices", min=1, max=4096)},)
    with warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript", "torch.onnx"):
        # "axis name batch will not be used": both inputs share the one batch axis, as meant.
        warnings.simplefilter("ignore", UserWarning)
        program = torch.onnx.export(
            graph.eval(), args, dynamo=True, input_names=list(example),
            output_names=["logits" if kind == "grader" else "heatmaps"],
            dynamic_shapes=shapes, opset_version=OPSET, verbose=False,
        )  # fmt: skip
    if program is None:
        raise OnnxError(f"{path.name}: torch's ONNX exporter returned no program")
    program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Warnings and errors only from ``loggers`` (the exporter's optimiser logs every initialiser
    it merges at INFO, which the CLI shows)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@torch.no_grad()
def _largest_difference(
    kind: str, net: nn.Module, path: Path, checks: list[dict[str, np.ndarray]]
) -> float:
    """Largest absolute probability difference between ONNX Runtime and torch on ``checks``."""
    session = _session(path, threads=torch.get_num_threads())
    names = {i.name for i in session.get_inputs()}
    diff = 0.0
    for feeds in checks:
        got = session.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        if kind == "grader":
            want = net(torch.from_numpy(feeds["crops"]), torch.from_numpy(feeds["level"]))
        else:
            want = net.heatmaps(torch.from_numpy(feeds["volumes"]))
        want_p, got_p = _probabilities(kind, want.numpy()), _probabilities(kind, got)
        diff = max(diff, float(np.abs(want_p - got_p).max()))
    return diff


# ------------------------------------------------------------------------------ the runtime


@functools.cache
def _shared_arena(ort) -> None:
    """Register the process's shared CPU arena with ONNX Runtime's environment, once."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0,
                             ort.OrtMemType.DEFAULT)  # fmt: skip
    # max_mem 0 (no cap), extend by what is asked (1: kSameAsRequested, not powers of two),
    # ONNX Runtime's defaults for the initial chunk and the dead bytes a chunk may keep.
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))


def _session(path: Path, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (the torch setting)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise OnnxError(f"ONNX Runtime is not installed; {EXTRA_HINT}") from err
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only: no per-session notices on the console
    # One memory arena for every session of the process: an ensemble holds 25 sessions, and an
    # arena of its own each kept its largest batch's activations for good (predict's peak 3.9 GB
    # against torch's 1.7; BENCHMARKS.md, "ONNX Runtime"). Without any arena it is slower.
    _shared_arena(ort)
    opts.add_session_config_entry("session.use_env_allocators", "1")
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        # As torch's OpenMP threads (see spinegrade.cli): on a shared machine, threads spinning
        # while they wait for a core slowed the ensemble many times over.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def read_onnx_sidecar(weights: str | Path) -> dict[str, Any] | None:
    """The sidecar of ``weights``' ONNX export, or None when there is no complete export."""
    onnx_path, sidecar_path = onnx_paths(weights)
    if not (onnx_path.is_file() and sidecar_path.is_file()):
        return None
    import json

    try:
        sidecar = json.loads(sidecar_path.read_text())
    except json.JSONDecodeError as err:
        raise OnnxError(f"{sidecar_path} is not valid JSON ({err}); re-export the run") from err
    if sidecar.get("format") != ONNX_FORMAT:
        raise OnnxError(f"{sidecar_path}: format {sidecar.get('format')!r}, not {ONNX_FORMAT!r}")
    return sidecar


def check_fresh(weights: str | Path, sidecar: Mapping[str, Any]) -> None:
    """Refuse an ONNX file made from other weights than the ``weights`` file beside it."""
    tensor_path, _ = weights_paths(weights)
    onnx_path, _ = onnx_paths(tensor_path)
    if not tensor_path.is_file():
        raise WeightsError(f"{tensor_path} does not exist; the ONNX file beside it has no weights")
    fix = (
        f"re-export: spinegrade export {tensor_path.parent.parent} --format onnx (or predict "
        "with --engine torch)"
    )
    if sidecar.get("source", {}).get("sha256") != sha256(tensor_path):
        raise OnnxError(
            f"{onnx_path} was exported from other weights than {tensor_path.name} (the weights "
            f"are newer than the export); {fix}"
        )
    if sidecar.get("onnx_sha256") != sha256(onnx_path):
        raise OnnxError(f"{onnx_path} is not the file that was exported and checked; {fix}")


def load_onnx(weights: str | Path, threads: int | None = None) -> OnnxNet:
    """The ONNX export of ``weights`` as an :class:`OnnxGrader` or :class:`OnnxLocalizer`.

    ``threads``: ONNX Runtime's intra-op threads (default: torch's current thread count, so both
    engines use what the user set). Raises :class:`OnnxError` when there is no export, or it is
    stale (:func:`check_fresh`).
    """
    sidecar = read_onnx_sidecar(weights)
    onnx_path, _ = onnx_paths(weights)
    if sidecar is None:
        raise OnnxError(
            f"{onnx_path} (or its sidecar) is missing: export the run with "
            f"`spinegrade export RUN_DIR --format onnx`, or predict with --engine torch"
        )
    check_fresh(weights, sidecar)
    cls = OnnxGrader if sidecar["spec"]["kind"] == "grader" else OnnxLocalizer
    return cls(onnx_path, sidecar, torch.get_num_threads() if threads is None else threads)


class OnnxNet:
    """An exported network in an ONNX Runtime session, called like its torch module (CPU)."""

    device = torch.device("cpu")

    def __init__(self, path: Path, sidecar: Mapping[str, Any], threads: int) -> None:
        self.path, self.sidecar = Path(path), dict(sidecar)
        self.session = _session(self.path, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.spec = self.sidecar.get("spec")
        # Where the torch net's backbone started (reports; see weights.init_source).
        self.init_source = self.sidecar.get("init", {"source": "unknown"})

    def eval(self) -> OnnxNet:
        return self

    def _run(self, **inputs: torch.Tensor) -> torch.Tensor:
        feeds = {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in self.input_names}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class OnnxGrader(OnnxNet):
    """:class:`~spinegrade.models.grader.SpineGrader` in ONNX Runtime: logits (B, T, K)."""

    def __call__(self, x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        return self._run(crops=x.float(), level=level.long())


class OnnxLocalizer(OnnxNet):
    """:class:`~spinegrade.models.localizer_net.LevelLocalizer`'s heatmaps in ONNX Runtime."""

    def __init__(self, path: Path, sidecar: Mapping[str, Any], threads: int) -> None:
        super().__init__(path, sidecar, threads)
        self.n_targets = int(self.spec["kwargs"]["n_targets"])

    def heatmaps(self, x: torch.Tensor) -> torch.Tensor:
        """Joint logits (B, T, S, h, w) of volumes ``x`` (B, S, H, W)."""
        return self._run(volumes=x.float())
