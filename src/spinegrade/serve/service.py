"""The grading loop: watch the PACS, retrieve, grade with the run's Predictor, store the SR + SC.

One code path with ``spinegrade predict``: every study is retrieved into a private work folder and
passed to :func:`spinegrade.inference.predict.predict` with the ensemble loaded once. A study whose
models graded nothing (unreadable images, no usable series) is a failure, never an SR of priors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import yaml
from pydicom.uid import generate_uid

from spinegrade.reporting.clinical import deweight_note
from spinegrade.serve.pacs import Pacs
from spinegrade.serve.sr import ModelIdentity, build_sc, build_sr, read_sr
from spinegrade.serve.state import State, StudyRow
from spinegrade.util.atomic import atomic_path

log = logging.getLogger(__name__)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass
class ServeConfig:
    """Settings of ``spinegrade serve`` (YAML keys of ``--config`` have the same names).

    ``token`` and ``pacs_password`` may instead come from the environment (``SPINEGRADE_TOKEN``,
    ``SPINEGRADE_PACS_USER``, ``SPINEGRADE_PACS_PASSWORD``); they are never logged or shown.
    """

    pacs_url: str = ""
    pacs_user: str | None = None
    pacs_password: str | None = None
    token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8765
    work_dir: str = "spinegrade_serve"  # state.db, results/, the per-study work folders
    poll_s: float = 30.0
    backoff_s: float = 60.0  # first retry after a failure; doubles, capped at an hour
    watch: str = "auto"  # auto (Orthanc change feed when the server is Orthanc) | qido | orthanc
    qido_filters: dict = field(default_factory=dict)  # extra QIDO-RS filters, e.g. StudyDescription
    device: str = "auto"
    engine: str = "auto"  # auto (ONNX Runtime when the run is exported) | torch | onnx
    folds: list[int] | None = None
    delete_superseded: bool = True  # Orthanc only: remove the results a newer grading replaced
    keep_work: bool = False  # keep retrieved images and caches (debugging)

    def __repr__(self) -> str:  # secrets never reach a log line through a repr
        return f"ServeConfig(pacs_url={self.pacs_url!r}, port={self.port}, watch={self.watch!r})"


def load_serve_config(path: Path | str | None = None, **overrides) -> ServeConfig:
    """File, then environment, then non-None ``overrides`` (the CLI's options)."""
    cfg = ServeConfig()
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(data) - set(ServeConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown serve setting(s) {sorted(unknown)}")
        for k, v in data.items():
            setattr(cfg, k, v)
    for key, env in (("token", "SPINEGRADE_TOKEN"), ("pacs_user", "SPINEGRADE_PACS_USER"),
                     ("pacs_password", "SPINEGRADE_PACS_PASSWORD")):  # fmt: skip
        if os.environ.get(env):
            setattr(cfg, key, os.environ[env])
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    if not cfg.pacs_url:
        raise ValueError("no PACS: give --pacs URL (the DICOMweb root) or pacs_url in --config")
    if not cfg.token:
        raise ValueError(
            "no access token for the web page: set SPINEGRADE_TOKEN or token in --config"
        )
    return cfg


def model_identity(run_dir: Path, folds: list[int]) -> ModelIdentity:
    """Run name, folds and a SHA-256 over the folds' weight files: the model a result came from."""
    from spinegrade.inference.run_folder import fold_dir

    h = hashlib.sha256()
    for k in folds:
        for f in sorted(fold_dir(run_dir, k).rglob("*.safetensors")):
            h.update(f.relative_to(run_dir).as_posix().encode())
            h.update(f.read_bytes())
    return ModelIdentity(Path(run_dir).resolve().name, list(folds), h.hexdigest()[:16])


def fingerprint(series) -> str:
    """What a grading depends on: the study's MR series and their instance counts."""
    key = sorted(f"{s.uid}:{s.n_instances}" for s in series if s.modality == "MR")
    return hashlib.sha256("|".join(key).encode()).hexdigest()[:16]


def is_uid(text: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return 0 < len(text) <= 64 and _UID.fullmatch(text) is not None


def study_key(study_uid: str) -> str:
    """Folder name of a study in the work folder (a hash: UIDs are long and may repeat prefixes)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


class GradingError(RuntimeError):
    """A study that cannot be graded (the reason is shown on the worklist)."""


class Service:
    """The loop's state and steps; :meth:`poll_once` is one discover + grade round."""

    def __init__(self, run_dir: Path | str, cfg: ServeConfig, predictor=None) -> None:
        from spinegrade.inference.ensemble import Predictor

        self.run_dir, self.cfg = Path(run_dir), cfg
        self.work = Path(cfg.work_dir)
        self.predictor = predictor or Predictor.from_run_dir(
            run_dir, cfg.folds, cfg.device, cfg.engine
        )
        self.task = self.predictor.task  # the run's: its conditions, grades and SR codes
        self.model = model_identity(self.run_dir, self.predictor.folds)
        self.pacs = Pacs(cfg.pacs_url, cfg.pacs_user, cfg.pacs_password)
        self.state = State(self.work / "state.db")
        resumed = self.state.resume()
        if resumed:
            log.info("resumed %d study(ies) interrupted by a restart", resumed)
        self.stop_event = threading.Event()
        self._skipped: set[str] = set()  # studies whose UID is not a DICOM UID, logged once

    # ------------------------------------------------------------------ watching

    def _usable(self, study_uid: str) -> bool:
        """Whether a study can be asked for by its UID; if not (e.g. "../x": every DICOMweb URL
        built from it is refused) it is named in the log once and skipped, never stalling the
        discovery of the others."""
        if is_uid(study_uid):
            return True
        if study_uid not in self._skipped:  # once, not at every QIDO poll
            self._skipped.add(study_uid)
            log.warning("a study whose Study Instance UID is not a DICOM UID (%r) was skipped: "
                        "correct it on the PACS", study_uid[:80])  # fmt: skip
        return False

    def discover(self) -> int:
        """Record every study the PACS shows (new or changed ones become pending)."""
        watch = self.cfg.watch
        if watch == "auto":
            watch = "orthanc" if self.pacs.orthanc_root else "qido"
        if watch == "orthanc":
            since = int(self.state.get_meta("orthanc_seq", "0"))
            uids, last = self.pacs.orthanc_changed_studies(since)
            infos = [self.pacs.study(u) for u in uids if self._usable(u)]
        else:
            infos, last = self.pacs.studies(self.cfg.qido_filters), None
            infos = [i for i in infos if self._usable(i["study_uid"])]
        n = 0
        for info in infos:
            if info is None:  # deleted since the change
                continue
            series = self.pacs.series(info["study_uid"])
            if not any(s.modality == "MR" for s in series):
                continue
            info["n_series"] = sum(s.modality == "MR" for s in series)
            self.state.observe(info["study_uid"], self.model.model_id, fingerprint(series), info)
            n += 1
        if last is not None:  # only after every change was recorded: a crash re-reads them
            self.state.set_meta("orthanc_seq", str(last))
        return n

    def poll_once(self) -> dict:
        """Discover, then grade every due study; one failure never stops the others."""
        found = self.discover()
        graded = failed = 0
        for row in self.state.due(self.model.model_id):
            if self.stop_event.is_set():
                break
            if self.process(row):
                graded += 1
            else:
                failed += 1
        return {"seen": found, "graded": graded, "failed": failed}

    def run_forever(self) -> None:
        while not self.stop_event.is_set():
            try:
                counts = self.poll_once()
                if counts["graded"] or counts["failed"]:
                    log.info("poll: %s", counts)
            except Exception as exc:  # the PACS may be down: keep trying, say why
                log.warning("poll failed (%s: %s); retrying", type(exc).__name__, exc)
            self.stop_event.wait(self.cfg.poll_s)

    # ------------------------------------------------------------------ grading

    def process(self, row: StudyRow) -> bool:
        from spinegrade.inference.predict import scrub_paths

        started = time.time()
        self.state.start(row.study_uid, row.model_id)
        try:
            result, sr_uid, sr_sop, sc_uid = self.grade(row)
        except Exception as exc:
            reason = scrub_paths(failure_reason(exc))[:500]
            wait = self.state.fail(row, reason, started, self.cfg.backoff_s)
            # The operator must act on a full disk; anything else may pass by itself.
            level = logging.ERROR if _disk_full(exc) else logging.WARNING
            log.log(level, "study %s failed (attempt %d): %s; retrying in %.0f s",
                    study_key(row.study_uid), row.attempts + 1, reason, wait)  # fmt: skip
            return False
        finally:
            if not self.cfg.keep_work:
                shutil.rmtree(self.work / "studies" / study_key(row.study_uid), ignore_errors=True)
        self.state.finish(row, result, sr_uid, sr_sop, sc_uid, started)
        log.info("study %s graded in %.1f s", study_key(row.study_uid), time.time() - started)
        return True

    def retrieve(self, study_uid: str, folder: Path) -> dict[str, pydicom.Dataset]:
        """WADO-RS every MR series into ``folder``; returns series UID -> one header (of the
        series' first file that parses)."""
        if folder.exists():
            shutil.rmtree(folder)
        headers = {}
        for s in self.pacs.series(study_uid):
            if s.modality != "MR":
                continue
            target = folder / study_key(s.uid)
            target.mkdir(parents=True)
            for k, data in enumerate(self.pacs.retrieve_series(study_uid, s.uid)):
                path = target / f"{k:05d}.dcm"
                path.write_bytes(data)  # as the PACS holds it: the reader judges every file
                if s.uid not in headers:
                    try:
                        headers[s.uid] = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                    except Exception:  # a damaged file, which the reader names; the next one
                        continue  # gives the series' header
        return headers

    def grade(self, row: StudyRow) -> tuple[dict, str, str, str]:
        """Retrieve, predict, build, validate and store; returns (result, SR series, SR SOP, SC)."""
        from spinegrade.inference.predict import FallbackError, predict
        from spinegrade.io.discover import stable_id

        t0 = time.perf_counter()
        key = study_key(row.study_uid)
        work = self.work / "studies" / key
        headers = self.retrieve(row.study_uid, work / "input")
        if not headers:
            raise GradingError("the study has no MR series on the PACS")
        t1 = time.perf_counter()
        try:
            res = predict(
                self.run_dir, work / "input", work / "submission.csv", report_dir=work / "report",
                cache_dir=work / "cache", device=self.predictor.device, progress=False,
                predictor=self.predictor,
            )  # fmt: skip
        except FallbackError as err:  # one study a call: nothing graded is this study's failure
            if err.result is None:
                raise GradingError(f"no target could be graded: {err}") from err
            # Its own warnings say why (a refused series, its file and what to do), not the
            # batch summary, which names a submission.csv the service's user never sees.
            res = err.result
        sid = stable_id(row.study_uid)
        warnings = res.warnings.get(sid, [])
        if sid not in res.study_ids or not res.graded_per_study or res.graded_per_study[0] == 0:
            raise GradingError("no target could be graded: " + ("; ".join(warnings) or "?"))
        grades = json.loads((work / "report" / str(sid) / "grades.json").read_text())
        task = self.task
        # The model's probabilities, and with the class-weight lean removed as prediction's
        # report already computed them (reporting.report.clinical_probs), named by grade.
        targets = grades["targets"]

        def by_grade(probs_of) -> list[np.ndarray]:  # a row per column, its condition's grades
            return [np.array([probs_of(targets[c])[g] for g in task.column_condition(c).grades])
                    for c in task.columns]  # fmt: skip

        raw = by_grade(lambda t: t["probabilities"])
        clinical = by_grade(lambda t: t["clinical"]["probabilities"])
        t2 = time.perf_counter()
        evidence = self._evidence(pd.read_csv(res.studies_path), headers)
        points = {c: grades["targets"][c]["point_lps_mm"] for c in task.columns}
        uids = result_uids(row.study_uid, self.model.model_id, row.fingerprint, row.sr_sop_uid)
        sr = build_sr(
            evidence, clinical, points, self.model, self._previous_sr(row), uids[:2], task
        )
        buf = io.BytesIO()
        sr.save_as(buf)
        check = read_sr(buf.getvalue(), task)  # validate by re-reading before anything is stored
        if not all(
            np.allclose(check["targets"][c]["probs"], clinical[k], atol=1e-6)
            for k, c in enumerate(task.columns)
        ):
            raise GradingError("the SR did not re-read to the grades it was built from")
        ref = next(iter(evidence.values()))
        report = work / "report" / str(sid)
        sc = build_sc(ref, report / "figure.png", uids[2:])
        # The results are written before anything goes to the PACS, so a full disk fails the
        # study with nothing filed there; they take their final names once the PACS holds them
        # (on any error every temporary file is removed: nothing half-written is left).
        files = {
            "sr.dcm": buf.getvalue(), "figure.png": (report / "figure.png").read_bytes(),
            "grades.json": (report / "grades.json").read_bytes(),  # the grades the SR holds
        }  # fmt: skip
        with contextlib.ExitStack() as pending:
            for name, data in files.items():
                _write(pending.enter_context(atomic_path(self.work / "results" / key / name)), data)
            self.pacs.store([sr, sc])
        t3 = time.perf_counter()
        self._supersede(row)
        result = {
            "task": task.name,
            "targets": {
                c: {"grade": task.column_condition(c).grades[int(np.argmax(clinical[k]))],
                    "clinical": [round(float(v), 4) for v in clinical[k]],
                    "submission": [round(float(v), 4) for v in raw[k]],
                    "source": grades["targets"][c]["source"]}
                for k, c in enumerate(task.columns)
            },
            "note": deweight_note(task),
            "warnings": warnings,
            "model": {"run": self.model.run, "folds": self.model.folds,
                      "model_id": self.model.model_id, "version": self.model.version,
                      "engine": res.engine, "notes": res.model_notes},
            "timings_s": {"retrieve": round(t1 - t0, 2), "predict": round(t2 - t1, 2),
                          "store": round(t3 - t2, 2)},
        }  # fmt: skip
        return result, str(sr.SeriesInstanceUID), str(sr.SOPInstanceUID), str(sc.SeriesInstanceUID)

    def _evidence(self, studies, headers: dict[str, pydicom.Dataset]) -> dict:
        """Series type -> a header of the series the model read for that type."""
        from spinegrade.io.discover import stable_id

        by_id = {stable_id(uid): h for uid, h in headers.items()}
        out = {}
        for sid, desc in studies[["series_id", "series_description"]].itertuples(index=False):
            if desc and desc not in out and int(sid) in by_id:
                out[desc] = by_id[int(sid)]
        return out or {"": next(iter(headers.values()))}

    def _previous_sr(self, row: StudyRow) -> pydicom.Dataset | None:
        if not row.sr_sop_uid:
            return None
        path = self.work / "results" / study_key(row.study_uid) / "sr.dcm"
        if not path.is_file():
            return None
        ds = pydicom.dcmread(path)
        # After a crash between filing a new SR and recording it, the file is that new SR: it
        # must not name itself as its own predecessor.
        return ds if ds.SOPInstanceUID == row.sr_sop_uid else None

    def _supersede(self, row: StudyRow) -> None:
        """Remove the result series a new grading replaces (Orthanc), so none is duplicated."""
        if not (row.sr_series_uid and self.cfg.delete_superseded):
            return
        for uid in (row.sr_series_uid, row.sc_series_uid):
            try:
                deleted = bool(uid) and self.pacs.orthanc_delete_series(uid)
            except Exception as exc:  # the new results are stored: never fail the study here
                log.warning("could not remove a superseded series (%s)", type(exc).__name__)
                continue
            if uid and not deleted:
                log.info("superseded series kept on the PACS (no delete there); the new SR "
                         "names it as a predecessor")  # fmt: skip


def result_uids(
    study_uid: str, model_id: str, fingerprint: str, previous_sop: str | None
) -> tuple[str, str, str, str]:
    """SR series, SR instance, SC series and SC instance UIDs of one grading, derived from it.

    A grading retried after a crash between the STOW-RS and the state update files the same
    UIDs again, so the PACS keeps or overwrites its copy instead of holding two SRs. The
    predecessor's UID is part of the seed: a study changed back to an earlier fingerprint gets new
    UIDs, never those of a result it superseded.
    """
    seed = [study_uid, model_id, fingerprint, previous_sop or ""]
    sr_series, sr, sc_series, sc = (
        generate_uid(entropy_srcs=[*seed, part]) for part in ("sr-series", "sr", "sc-series", "sc")
    )
    return sr_series, sr, sc_series, sc


def failure_reason(exc: BaseException) -> str:
    """The worklist's line for a failed study."""
    if _disk_full(exc):
        return ("the disk is full (no space left on device) in the work folder: free space there; "
                "nothing was filed into the PACS and the study is retried")  # fmt: skip
    if isinstance(exc, GradingError):  # our own words about the study: no class name before
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name says the file is done
