"""A run's fold ensemble: which folds, where they run, and their averaged probabilities."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spinegrade.task import CONDITIONS, LEVELS, Task

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- ensemble


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is visible; use --device cpu")
    return device


ENGINES = ("auto", "torch", "onnx")


def resolve_engine(engine: str, fold_dirs: Sequence[Path], device: str) -> str:
    """``auto`` -> ``onnx`` when every network of the folds has its ONNX export and ONNX Runtime is
    installed (CPU only), else ``torch``; ``onnx`` insists (errors say what to do).

    A stale export (weights changed after it) is refused when it is loaded, in ``auto`` too: a
    user who exported expects ONNX Runtime to grade, and must learn that the files are old.
    """
    from spinegrade.inference.export import fold_networks
    from spinegrade.models.onnx import EXTRA_HINT, onnx_paths, runtime_available

    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "torch":
        return "torch"
    if engine == "onnx" and device != "cpu":
        raise ValueError(f"--engine onnx runs on the CPU, not {device}: add --device cpu")
    if engine == "onnx" and not runtime_available():
        raise ValueError(f"--engine onnx: ONNX Runtime is not installed; {EXTRA_HINT}")
    if engine == "onnx":
        return "onnx"  # a missing export is named when the folds load
    if device != "cpu" or not runtime_available():
        return "torch"
    nets = [w for d in fold_dirs for w in fold_networks(Path(d))]
    exported = [all(p.is_file() for p in onnx_paths(w)) for w in nets]
    if nets and all(exported):
        return "onnx"
    if any(exported):
        missing = next(w for w, e in zip(nets, exported, strict=True) if not e)
        log.warning(
            "%s has no ONNX export while other networks of the run have one: grading with torch; "
            "run `spinegrade export RUN_DIR --format onnx` again",
            missing,
        )
    return "torch"


def describe_engine(engine: str) -> str:
    """``onnxruntime 1.32.0`` or ``torch 2.14.1``: what graded, for reports and the CLI."""
    if engine == "onnx":
        from spinegrade.models.onnx import runtime_version

        return f"onnxruntime {runtime_version()}"
    import torch

    return f"torch {torch.__version__.split('+')[0]}"


def parse_folds(values: list[str] | None) -> list[int] | None:
    """``["0,1", "3"]`` -> ``[0, 1, 3]``; None or empty -> None (all folds)."""
    if not values:
        return None
    out: list[int] = []
    for part in ",".join(values).replace(" ", ",").split(","):
        if not part:
            continue
        if not part.isdigit():
            raise ValueError(f"--folds: {part!r} is not a fold number; e.g. --folds 0,1,2")
        out.append(int(part))
    return sorted(set(out)) or None


def run_folds(run_dir: Path, folds: list[int] | None = None) -> list[int]:
    """The folds of ``run_dir`` to ensemble: ``folds`` if given (each must be complete), else all
    complete ones (an incomplete fold is skipped with a warning)."""
    from spinegrade.inference.run_folder import fold_dir, fold_done

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(
            f"{run_dir}: not a run folder (no config.yaml); train one with `spinegrade train`"
        )
    found = sorted(
        int(p.name.split("_", 1)[1])
        for p in run_dir.glob("fold_*")
        if p.is_dir() and p.name.split("_", 1)[1].isdigit()
    )
    if folds:
        bad = [k for k in folds if not fold_done(run_dir, k)]
        if bad:
            raise ValueError(
                f"{run_dir}: fold(s) {bad} are not trained to completion (no "
                f"{fold_dir(run_dir, bad[0]).name}/metrics.json); pick from {found}"
            )
        return sorted(set(folds))
    done = [k for k in found if fold_done(run_dir, k)]
    for k in sorted(set(found) - set(done)):
        log.warning("%s: fold %d is incomplete and is left out of the ensemble", run_dir, k)
    if not done:
        raise ValueError(
            f"{run_dir}: no completed fold (fold_K/metrics.json); finish `spinegrade train` first"
        )
    return done


@dataclass
class EnsemblePrediction:
    """One study through every fold: mean probabilities, the points graded, what models saw."""

    probs: np.ndarray  # (columns, classes) in the task's column order ((25, 3) for RSNA)
    graded: np.ndarray  # bool (columns,): some fold's grader saw this target
    points: np.ndarray  # (5, 5, 3) LPS mm, the folds' consensus; NaN where no fold located it
    discs: np.ndarray | None = None  # (5, 3) LPS mm disc centres; NaN where unknown


@contextlib.contextmanager
def fold_map(device: str, n_folds: int) -> Iterator[Callable[..., Iterable[Any]]]:
    """``map`` for the folds' share of one study: on CPU, the folds side by side.

    The folds' nets are small, so torch's threads inside one of them leave the cores ~40% idle
    (CPU time 1.2x the wall time on 2 cores). Run instead as many folds at once as torch has
    threads (at most all of them), the threads shared out among them: on the demo run, 2 cores,
    3.5-3.7 -> 2.0 s a study (BENCHMARKS.md, "Prediction latency"). With torch's OpenMP build each
    calling thread runs its own team of that many threads; the count is process-wide, so it is
    set for this block and restored after it. Prediction runs one study at a time (``predict``,
    the service), and worker processes (``--workers``) run single-threaded, so they get plain
    ``map``; so does a GPU.
    """
    import torch

    before = torch.get_num_threads()
    n = min(n_folds, before) if device == "cpu" else 1
    if n <= 1:
        yield map
        return
    torch.set_num_threads(max(1, before // n))  # 2 cores, 5 folds: 2 at a time, 1 thread each
    try:
        with ThreadPoolExecutor(n) as pool:
            yield pool.map  # results in the folds' order, whatever order they finish in
    finally:
        torch.set_num_threads(before)


class Predictor:
    """The fold ensemble of a run folder: every fold localises and grades; probabilities average.

    A target is averaged over the folds that could grade it (a fold whose localiser put the point
    outside every series falls back for that target); when none could, the folds' training
    fallback (best constant per column, learned on each fold's training studies) is used.
    """

    def __init__(
        self, run_dir: Path, folds: list[int], models: list, device: str, engine: str = "torch"
    ) -> None:
        self.run_dir, self.folds, self.models, self.device = run_dir, folds, models, device
        self.engine = engine  # "torch" or "onnx": what runs the networks
        self._saliency_nets: dict[str, Any] = {}

    @classmethod
    def from_run_dir(
        cls,
        run_dir: Path | str,
        folds: list[int] | None = None,
        device: str = "auto",
        engine: str = "auto",
    ) -> Predictor:
        """Load the folds' localisers and graders (safetensors + JSON only, or their checked
        ONNX exports: :func:`resolve_engine`) from ``run_dir``, once."""
        from spinegrade.inference.fold_models import load_fold_models
        from spinegrade.inference.run_folder import fold_dir
        from spinegrade.task import dataset_task

        run_dir, device = Path(run_dir), resolve_device(device)
        dataset_task(run_dir)  # an unreadable task.yaml stops here, before the folds load
        chosen = run_folds(run_dir, folds)
        engine = resolve_engine(engine, [fold_dir(run_dir, k) for k in chosen], device)
        models = [
            load_fold_models(fold_dir(run_dir, k), device=device, engine=engine) for k in chosen
        ]
        return cls(run_dir, chosen, models, device, engine)

    @property
    def engine_name(self) -> str:
        """What grades, with its version (e.g. ``onnxruntime 1.32.0``)."""
        return describe_engine(self.engine)

    @property
    def task(self) -> Task:
        """What the run grades (its ``task.yaml``; RSNA 2024 for runs without one)."""
        return self.models[0].task

    @property
    def init(self) -> dict[str, list[dict]]:
        """Where the ensemble's backbones started training (see :func:`.weights.summarize_init`):
        ``{"model": [...], "localizer": [...]}``, each a list of distinct sources."""
        from spinegrade.models.weights import init_source, summarize_init

        def nets(m) -> dict[str, dict]:
            out = {f"localizer_{k}": init_source(v) for k, v in m.localizer.nets.items()}
            return out | {f"grader_{k}": init_source(v) for k, v in m.graders.items()}

        return summarize_init(nets(m) for m in self.models)

    def describe_init(self) -> list[str]:
        """One line per backbone for reports, e.g. ``model backbone: ImageNet, hub timm/...``."""
        from spinegrade.models.weights import describe_source

        return [
            f"{role} backbone: {'; '.join(describe_source(s) for s in sources)}"
            for role, sources in self.init.items()
            if sources
        ]

    def describe_training(self) -> list[str]:
        """Cautions for networks that some fold trained on phantom studies only (else empty).

        Both stages phantom-only: :data:`PHANTOM_CAUTION`. A localiser that learned from real
        spines with graders that did not (the demo): the grades are not validated on real images
        (:func:`grader_caution`); the reverse: :data:`LOCALIZER_CAUTION`.
        """
        only = {"phantom"}

        def phantom_only(role: str) -> bool:
            return any(set(m.training_data.get(role, ())) == only for m in self.models)

        loc, grad = phantom_only("localizer"), phantom_only("grader")
        if loc and (grad or not any(m.training_data.get("grader") for m in self.models)):
            return [PHANTOM_CAUTION]
        lines = [LOCALIZER_CAUTION] if loc else []
        if grad:
            kinds = sorted({k for m in self.models for k in m.training_data.get("localizer", ())})
            lines.append(
                grader_caution(kinds, self._phantom_only_series() if "real" in kinds else ())
            )
        return lines

    def _phantom_only_series(self) -> list[str]:
        """Series whose localiser net some fold trained on phantoms only (the demo's sagittal T1:
        SPIDER has no T1), named so that the caution does not credit it with real spines."""
        from spinegrade.inference.fold_models import localizer_kinds
        from spinegrade.localization.tasks import LOCALIZER_TASKS

        names = {
            name
            for m in self.models
            for name, kinds in localizer_kinds(m.net_data).items()
            if kinds == {"phantom"}
        }
        return sorted(LOCALIZER_TASKS[n].description for n in names if n in LOCALIZER_TASKS)

    @property
    def training_data(self) -> dict[str, list[str]]:
        """Role -> kinds of data any fold's networks of that role learned from."""
        out: dict[str, set[str]] = {}
        for m in self.models:
            for role, kinds in m.training_data.items():
                out.setdefault(role, set()).update(kinds)
        return {role: sorted(kinds) for role, kinds in sorted(out.items())}

    @property
    def crop_config(self):
        return self.models[0].crops

    @property
    def fallback(self) -> np.ndarray:
        """(columns, classes) mean of the folds' training fallbacks."""
        return np.mean([m.fallback for m in self.models], axis=0)

    def predict(self, stacks) -> EnsemblePrediction:
        """Ensemble prediction for one study's chosen stacks (description -> stacks); see
        :meth:`predict_many`."""
        return self.predict_many({0: stacks})[0]

    def predict_many(
        self, studies: Mapping[int, Mapping], batch_size: int = 8
    ) -> dict[int, EnsemblePrediction]:
        """Ensemble prediction for many studies (study -> description -> stacks), batched.

        Every fold localises, its zoomed look centred where the folds' whole looks agree, and
        the folds' points are combined (:func:`.localize.localize_consensus_many`, so one fold's
        misnamed levels are outvoted); every fold grades at the combined points.
        So folds with the same crop settings grade the same crops: they are cut once, as are the
        looks every fold takes alike. Each network pass takes the looks or crops of several
        studies (``batch_size`` stacks a localiser pass, 64 crops a grader pass), so one call
        with many studies costs less than one call a study; the numbers are the same up to float
        rounding. On CPU with torch the folds run side by side (:func:`fold_map`).
        """
        from spinegrade.inference import fold_models
        from spinegrade.localization.localize import localize_consensus_many
        from spinegrade.localization.points import StudyPoints

        seen = {sid: st for sid, st in studies.items() if st}
        # ONNX Runtime's sessions hold their own threads (torch's count), so its folds take turns.
        side_by_side = len(self.models) if self.engine == "torch" else 1
        with fold_map(self.device, side_by_side) as each_fold:
            located = localize_consensus_many(
                [m.localizer for m in self.models], seen, each_fold, batch_size
            )
            points = {sid: located.get(sid, StudyPoints()) for sid in studies}
            views: dict[str, dict[int, list]] = {}
            for m in self.models:
                key = repr(m.crops)  # the crop settings (a dataclass): equal settings, equal crops
                if key not in views:
                    views[key] = {
                        sid: fold_models.crop_views(st, points[sid], m.crops, m.task)
                        for sid, st in seen.items()
                    }

            def grade(m: Any) -> dict:
                return fold_models.grade_studies(m, views[repr(m.crops)], points)

            preds = list(each_fold(grade, self.models))
        return {sid: self._combine([p[sid] for p in preds], points[sid]) for sid in studies}

    @staticmethod
    def _combine(preds: Sequence, points) -> EnsemblePrediction:
        """The folds' predictions of one study -> their mean where any fold graded a target."""
        graded = np.stack([p.graded for p in preds])  # (F, columns)
        probs = np.stack([p.probs for p in preds])  # (F, columns, classes)
        seen = graded.any(axis=0)
        weights = np.where(seen[None, :], graded, 1.0)[..., None]  # unseen: mean of fallbacks
        mean = (probs * weights).sum(axis=0) / weights.sum(axis=0)
        mean /= mean.sum(axis=1, keepdims=True)
        return EnsemblePrediction(mean, seen, points.xyz, points.disc)

    def prior_prediction(self) -> EnsemblePrediction:
        """What a study no model could see gets: the folds' training fallback everywhere."""
        probs = self.fallback / self.fallback.sum(axis=1, keepdims=True)
        nan_points = np.full((len(CONDITIONS), len(LEVELS), 3), np.nan)
        graded = np.zeros(len(self.task.columns), dtype=bool)
        return EnsemblePrediction(probs, graded, nan_points, np.full((len(LEVELS), 3), np.nan))

    def _saliency_net(self, group: str) -> Any:
        """The first fold's torch grader of ``group``: saliency needs its gradients, which ONNX
        Runtime does not give, so with that engine it is loaded from its weights for reports."""
        model = self.models[0].graders.get(group)
        if model is None or self.engine == "torch":
            return model
        if group not in self._saliency_nets:
            from spinegrade.inference.run_folder import fold_dir, grader_file
            from spinegrade.models.registry import load_model

            # The first member where a fold has several (train.members).
            path = grader_file(fold_dir(self.run_dir, self.folds[0]), group)
            self._saliency_nets[group] = load_model(path, device=self.device)[0]
        return self._saliency_nets[group]

    def saliency(self, column: str, crop: np.ndarray) -> np.ndarray | None:
        """Where the first fold's grader looked for ``column`` on ``crop`` (see report): the
        input gradient of the expected grade of the column's condition."""
        import torch

        from spinegrade.reporting.report import input_saliency

        task = self.task
        condition = task.column_condition(column)
        model = self._saliency_net(condition.group)
        if model is None:
            return None
        level = torch.tensor([LEVELS.index(task.column_level(column))], device=self.device)
        head, n = (0 if task.is_rsna else task.head_of(condition.name)), len(condition.grades)
        severity = torch.arange(n, dtype=torch.float32, device=self.device)

        def expected_severity(x: torch.Tensor) -> torch.Tensor:
            logits = model.eval()(x.to(self.device), level)[:, head, :n]
            return (logits.float().softmax(-1) * severity).sum()

        return input_saliency(expected_severity, crop)


# Shown with the predictions of a run trained on `spinegrade synth` data only. On 38 real sagittal
# T2 series (SPIDER, BENCHMARKS.md "Real anatomy") the demo's fold consensus put a third of the
# levels more than 5 mm from their disc and named about one in six as a neighbouring disc.
PHANTOM_CAUTION = (
    "Trained on synthetic phantom studies only: on real spines its localiser can put a level "
    "one disc off, and its grades are not validated on real images. Check the level labels on "
    "each figure; not for clinical use."
)
# A localiser trained on phantoms only, beside graders that learned from real images.
LOCALIZER_CAUTION = (
    "Its localiser learned from synthetic phantom studies only: on real spines it can put a "
    "level one disc off. Check the level labels on each figure."
)


def grader_caution(localizer_kinds: Sequence[str], phantom_only: Sequence[str] = ()) -> str:
    """The caution of graders trained on phantoms only (e.g. the demo's), naming what the
    localiser learned from, and the series (``phantom_only``) whose localiser net learned from
    phantoms alone where another learned from real spines."""
    seen = {"phantom": "synthetic phantoms", "real": "real spines"}
    source = " and ".join(seen.get(k, k) for k in localizer_kinds) or "data not recorded"
    if phantom_only:
        source += f" (its {' and '.join(phantom_only)} net on phantoms only)"
    return (
        f"Levels found by a localiser trained on {source}; grades from graders trained on "
        "synthetic phantom studies only: the grades are not validated on real images. Not for "
        "clinical use."
    )
