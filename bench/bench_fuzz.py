"""Mutation fuzzing: flipped, truncated and spliced bytes of valid series, through the reader and
predict, each case counted as graded, refused with a clear message, crashed or hung.

Seeds are valid series: small generated ones in several encodings (explicit and implicit VR, no
preamble, big endian, deflated, RLE, JPEG-LS, JPEG 2000, enhanced multi-frame) and real ones
(the SPIDER T2-SPACE series under ``../shared/real/spider-t2space``, else the repository's
vendored copy). Each case copies one seed series and mutates one or two of its files with one
to three operators (bit flips, "interesting" integers such as 0xFFFFFFFF written over length
fields, truncation, a chunk spliced in from another seed file, deleted or duplicated) or the
series itself (a file dropped, doubled, or swapped for one of another series). Offsets fall in
the header four times in five: flips in pixel data only change pixel values.

The reader cases run ``read_series`` on the case folder; a sample runs ``predict`` on it (one
study, a run folder's ensemble loaded once per worker). Every case runs in a worker process with
a time limit: a case past it is ``hung`` and its worker is killed and replaced. Outcomes:

- ``graded``: stacks were read (predict: the study got model grades), perhaps without some files;
- ``refused``: a clear message (the reader's DicomReadError; for predict what the CLI prints as
  one line and exit 2: ValueError, FileNotFoundError, KeyError);
- ``crashed``: any other exception, a worker that died, a traceback logged, an input file that
  changed, or (predict) a study whose prediction failed or hit an unexpected error;
- ``hung``: past ``--timeout`` seconds.

Two more counts cut across those: ``generic``, cases whose message was the reader's generic
reason for an exception no check foresaw ("unreadable (Type: ...)": a message, but not a clear
one), and ``noisy``, cases where pydicom's logging or a Python warning reached the output.

    .venv/bin/python bench/bench_fuzz.py [--cases 3000] [--predict-cases 100] [--seed 0]
        [--timeout 20] [--workers 2] [--run RUN_DIR] [--real DIR] [--keep DIR]

Without ``--run`` a tiny 2-fold run is trained first (about 30 s; like the tests'). ``--keep``
copies every crashed or hung case there, with ``case.json`` saying how it was made, to become a
test in tests/hostile_corpus.py. Prints figures; exits 1 when a case crashed or hung.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

OUTCOMES = ("graded", "refused", "crashed", "hung")
GENERIC = "unreadable ("  # the reader's reason for an exception no check foresaw
# Written over header bytes: zero, all ones, sign bits, lengths one short of 4 GB, small counts.
INTERESTING = [
    b"\x00\x00", b"\xff\xff", b"\x00\x80", b"\xff\x7f", b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff", b"\xfe\xff\xff\xff", b"\xff\xff\xff\x7f", b"\x01\x00\x00\x00",
    b"\x00\x01", b"\x10\x00", b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0",
]  # fmt: skip


# ------------------------------------------------------------------------------- seeds


def generated_seeds(root: Path) -> list[Path]:
    """Small valid series in the encodings a PACS sends (one folder each)."""
    import pydicom
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        ExplicitVRBigEndian,
        JPEG2000Lossless,
        JPEGLSLossless,
        RLELossless,
    )

    from hostile_corpus import uid, write_series
    from spinegrade.io.files import pydicom_quiet

    out = []
    with pydicom_quiet():
        for name, syntax in (
            ("explicit", None), ("rle", RLELossless), ("deflated", DeflatedExplicitVRLittleEndian),
            ("jpegls", JPEGLSLossless), ("j2k", JPEG2000Lossless),
        ):  # fmt: skip
            folder = root / f"gen_{name}"
            try:
                if syntax in (JPEGLSLossless, JPEG2000Lossless):
                    paths = write_series(folder, uid("fuzz", name), n=4)
                    for p in paths:
                        ds = pydicom.dcmread(p)
                        ds.compress(syntax, generate_instance_uid=False)
                        ds.save_as(p)
                else:
                    write_series(folder, uid("fuzz", name), n=4, syntax=syntax)
            except Exception as exc:  # an encoder this machine lacks: that seed is left out
                print(f"seed {name} left out: {type(exc).__name__}: {exc}")
                shutil.rmtree(folder, ignore_errors=True)
                continue
            out.append(folder)
        folder = root / "gen_implicit_no_preamble"
        for p in write_series(folder, uid("fuzz", "implicit"), n=4):
            ds = pydicom.dcmread(p)
            ds.preamble = None
            del ds.file_meta
            ds.save_as(p, implicit_vr=True, little_endian=True)
        out.append(folder)
        big = root / "gen_big_endian"
        for p in write_series(big, uid("fuzz", "big"), n=4):
            ds = pydicom.dcmread(p)
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            pydicom.filewriter.dcmwrite(
                p, ds, implicit_vr=False, little_endian=False, force_encoding=True
            )
        out.append(big)
        from hostile_corpus import KIND_BY_NAME

        enhanced = root / "gen_enhanced"
        KIND_BY_NAME["enhanced_multiframe"].write(enhanced, uid("fuzz", "enhanced"))
        out.append(enhanced)
    return out


def real_seeds(real: Path | None, root: Path, n_cases: int) -> list[Path]:
    """``n_cases`` SPIDER series folders (real scanner files), from ``real`` or the vendored
    tarball."""
    series = real / "series" if real is not None else None
    if series is None or not series.is_dir():
        tarball = REPO / "vendor" / "spider-t2space" / "spider-t2space.tar.xz"
        with tarfile.open(tarball) as tar:
            tar.extractall(root / "vendored", filter="data")
        series = next((root / "vendored").rglob("series"))
    return sorted(p for p in series.iterdir() if p.is_dir())[:n_cases]


# --------------------------------------------------------------------------- mutations


def _header_end(data: bytes) -> int:
    """Offset of the PixelData element (little or big endian), or the file length."""
    ends = [data.find(tag) for tag in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")]
    return min((e for e in ends if e > 0), default=len(data))


def _offset(rng: np.random.Generator, data: bytes) -> int:
    """A byte offset: in the header four times in five (flips in pixel data change pixels only)."""
    if not data:
        return 0
    end = max(1, min(_header_end(data) + 12, len(data)))
    return int(rng.integers(0, end if rng.random() < 0.8 else len(data)))


def mutate_bytes(rng: np.random.Generator, data: bytes, donor: bytes) -> tuple[bytes, str]:
    """One operator applied to ``data``; returns the new bytes and what was done."""
    buf = bytearray(data)
    op = rng.choice(["flip", "interesting", "truncate", "splice", "insert", "delete", "repeat"])
    at = _offset(rng, data)
    if op == "flip":
        n = int(rng.choice([1, 2, 4, 16, 64]))
        for _ in range(n):
            k = _offset(rng, data)
            if k < len(buf):
                buf[k] ^= 1 << int(rng.integers(0, 8))
        return bytes(buf), f"flip {n} bit(s)"
    if op == "interesting":
        value = INTERESTING[int(rng.integers(0, len(INTERESTING)))]
        at -= at % 2  # DICOM elements start on even offsets
        buf[at : at + len(value)] = value
        return bytes(buf), f"write {value.hex()} at {at}"
    if op == "truncate":
        return bytes(buf[:at]), f"truncate at {at}"
    n = int(rng.integers(2, 512))
    start = int(rng.integers(0, max(1, len(donor) - n)))
    chunk = donor[start : start + n]
    if op == "splice":
        buf[at : at + len(chunk)] = chunk
        return bytes(buf), f"splice {len(chunk)} donor bytes at {at}"
    if op == "insert":
        return bytes(buf[:at] + chunk + buf[at:]), f"insert {len(chunk)} donor bytes at {at}"
    if op == "delete":
        n = int(rng.integers(1, 64))
        return bytes(buf[:at] + buf[at + n :]), f"delete {n} bytes at {at}"
    n = int(rng.integers(2, 256))
    return bytes(buf[:at] + buf[at : at + n] * 2 + buf[at + n :]), f"repeat {n} bytes at {at}"


def make_case(rng: np.random.Generator, seeds: list[Path], folder: Path) -> dict:
    """Copy a seed series into ``folder`` and mutate it; returns how (for ``case.json``)."""
    seed = seeds[int(rng.integers(0, len(seeds)))]
    shutil.copytree(seed, folder)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    donors = [p for s in seeds for p in sorted(s.iterdir()) if p.is_file()]
    what: list[str] = []
    if rng.random() < 0.1:  # the series, not a file: one dropped, doubled or from elsewhere
        victim = files[int(rng.integers(0, len(files)))]
        choice = rng.choice(["drop", "double", "foreign"])
        if choice == "drop" and len(files) > 1:
            victim.unlink()
        elif choice == "double":
            shutil.copy(victim, folder / f"copy_{victim.name}")
        else:
            donor = donors[int(rng.integers(0, len(donors)))]
            shutil.copy(donor, folder / f"foreign_{donor.parent.name}_{donor.name}")
        what.append(f"{choice} {victim.name}")
        files = sorted(p for p in folder.iterdir() if p.is_file())
    for victim in rng.choice(files, size=min(len(files), int(rng.integers(1, 3))), replace=False):
        data = victim.read_bytes()
        for _ in range(int(rng.integers(1, 4))):
            donor = donors[int(rng.integers(0, len(donors)))].read_bytes()
            data, op = mutate_bytes(rng, data, donor)
            what.append(f"{victim.name}: {op}")
        victim.write_bytes(data)
    return {"seed": seed.name, "mutations": what}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- workers


class _Errors(logging.Handler):
    """Collects what would reach the user as an error or a traceback (``lines``), and what
    pydicom or a Python warning would print beside our own messages (``noise``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.noise: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = f"{record.name}: {record.getMessage()}"[:300]
        if record.levelno >= logging.ERROR or record.exc_info:
            self.lines.append(text)
        elif record.name.startswith(("pydicom", "py.warnings")):
            self.noise.append(text)


def read_case(folder: Path) -> tuple[str, str]:
    """(outcome, detail) of ``read_series`` on one case folder."""
    from spinegrade.io import DicomReadError, read_series

    try:
        series = read_series(folder)
    except DicomReadError as exc:
        text = str(exc)
        return "refused", ("generic: " if GENERIC in text else "") + text[:300]
    except Exception as exc:
        return "crashed", "".join(traceback.format_exception(exc))[-1500:]
    generic = [s.reason for s in series.skipped if s.reason.startswith(GENERIC)]
    if generic:
        return "graded", "generic: " + generic[0][:300]
    return "graded", "\n".join(f"skipped: {s.reason}" for s in series.skipped)


def predict_case(folder: Path, state: dict) -> tuple[str, str]:
    """(outcome, detail) of ``predict`` on one case folder (one study, raw input)."""
    from spinegrade.inference.predict import predict

    work = Path(tempfile.mkdtemp(prefix="fuzz_predict_"))
    try:
        res = predict(
            state["run"], folder, work / "sub.csv", cache_dir=work / "cache", progress=False,
            predictor=state["predictor"],
        )  # fmt: skip
    except (ValueError, FileNotFoundError, NotADirectoryError, KeyError) as exc:
        text = str(exc.args[0] if isinstance(exc, KeyError) and exc.args else exc)
        return "refused", ("generic: " if GENERIC in text else "") + text[:300]
    except Exception as exc:
        return "crashed", "".join(traceback.format_exception(exc))[-1500:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warns = [w for ws in res.warnings.values() for w in ws]
    bad = [w for w in warns if "prediction failed" in w or "unexpected error" in w]
    if bad:
        return "crashed", bad[0][:1500]
    generic = [w for w in warns if GENERIC in w]
    return "graded", ("generic: " + generic[0][:300]) if generic else ""


def probe_case(folder: Path) -> tuple[str, str]:
    """The bench's own check (mode "probe"): a folder named ``*hang*`` sleeps, ``*die*`` kills
    the worker, ``*raise*`` logs a traceback; anything else is read like a reader case."""
    if "hang" in folder.name:
        time.sleep(3600)
    if "die" in folder.name:
        os._exit(3)
    if "raise" in folder.name:
        logging.getLogger("spinegrade").exception("probe", exc_info=RuntimeError("probe"))
    return read_case(folder)


def _worker(conn: Connection, mode: str, run_dir: str | None) -> None:
    """Serve cases from ``conn`` until it closes: read (or predict) each, send the outcome."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    errors = _Errors()
    logging.basicConfig(level=logging.WARNING, handlers=[errors])
    logging.captureWarnings(True)  # a warning printed to the user is counted as noise
    state: dict = {}
    if mode == "predict":
        import torch

        from spinegrade.inference.ensemble import Predictor

        torch.set_num_threads(1)
        state = {"run": Path(run_dir), "predictor": Predictor.from_run_dir(Path(run_dir))}
    conn.send("ready")
    while True:
        try:
            folder = conn.recv()
        except EOFError:
            return
        before = digest(Path(folder))
        errors.lines.clear()
        errors.noise.clear()
        t = time.perf_counter()
        if mode == "predict":
            outcome, detail = predict_case(Path(folder), state)
        elif mode == "probe":
            outcome, detail = probe_case(Path(folder))
        else:
            outcome, detail = read_case(Path(folder))
        if errors.lines and outcome != "crashed":
            outcome, detail = "crashed", "logged: " + errors.lines[0]
        if digest(Path(folder)) != before:
            outcome, detail = "crashed", "the input changed"
        noise = errors.noise[0] if errors.noise else ""
        conn.send((outcome, detail, time.perf_counter() - t, noise))


@dataclass
class Result:
    case: int
    outcome: str
    detail: str
    seconds: float
    made: dict = field(default_factory=dict)
    noise: str = ""  # the first pydicom or Python warning that reached the output, if any


class TimedWorkers:
    """Worker processes that each take one case at a time; a case past ``timeout`` seconds is
    ``hung``, its worker killed and replaced (a process is the only thing that can be stopped
    in the middle of a C decoder)."""

    def __init__(self, n: int, mode: str, run_dir: Path | None, timeout: float) -> None:
        self.ctx = mp.get_context("spawn")
        self.mode, self.run_dir, self.timeout = mode, run_dir, timeout
        self.workers = [self._start() for _ in range(n)]

    def _start(self) -> dict:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(
            target=_worker, args=(child, self.mode, str(self.run_dir)), daemon=True
        )
        proc.start()
        child.close()
        if not parent.poll(300) or parent.recv() != "ready":
            raise RuntimeError(f"a {self.mode} worker did not start")
        return {"proc": proc, "conn": parent, "job": None, "since": 0.0}

    def run(self, cases: list[int], make, done) -> list[Result]:
        """Run ``cases``: ``make(case) -> (folder, how)`` writes one just before it is sent,
        ``done(result, folder)`` is called when it is over (and may delete the folder)."""
        todo, results = list(reversed(cases)), []
        while todo or any(w["job"] for w in self.workers):
            for w in self.workers:
                if w["job"] is None and todo:
                    case = todo.pop()
                    folder, made = make(case)
                    w["job"], w["since"] = (case, folder, made), time.perf_counter()
                    w["conn"].send(str(folder))
            busy = [w for w in self.workers if w["job"] is not None]
            ready = wait([w["conn"] for w in busy], timeout=1.0)
            for i, w in enumerate(self.workers):
                if w["job"] is None:
                    continue
                case, folder, made = w["job"]
                if w["conn"] in ready:
                    noise = ""
                    try:
                        outcome, detail, seconds, noise = w["conn"].recv()
                    except EOFError:  # the worker died: a segfault or the OOM killer
                        outcome, detail = "crashed", f"worker died (exit {w['proc'].exitcode})"
                        seconds = time.perf_counter() - w["since"]
                        self._replace(i)
                    result = Result(case, outcome, detail, seconds, made, noise)
                elif time.perf_counter() - w["since"] > self.timeout:
                    result = Result(case, "hung", f"> {self.timeout:g} s", self.timeout, made)
                    self._replace(i)
                else:
                    continue
                self.workers[i]["job"] = None
                results.append(result)
                done(result, folder)
        return sorted(results, key=lambda r: r.case)

    def _replace(self, i: int) -> None:
        old = self.workers[i]
        old["proc"].kill()
        old["proc"].join()
        self.workers[i] = self._start()

    def close(self) -> None:
        for w in self.workers:
            w["conn"].close()
            w["proc"].join(timeout=10)
            if w["proc"].is_alive():
                w["proc"].kill()


# ------------------------------------------------------------------------------ driver


def train_tiny_run(root: Path) -> Path:
    """A tiny 2-fold run on a few phantom studies (the tests' recipe), for the predict cases."""
    from spinegrade.config import load_config
    from spinegrade.phantom import generate_dataset
    from spinegrade.preprocessing.build import preprocess_dataset
    from spinegrade.training.cv import cross_validate
    from tiny_config import TINY_RUN

    data = root / "data"
    generate_dataset(data, n_train=4, n_test=0, seed=3, workers=1)
    cfg = load_config("quick", TINY_RUN)
    preprocess_dataset(data, root / "cache", "train", size=cfg.data.cache_size,
                       mm=cfg.data.cache_mm, progress=False)  # fmt: skip
    cross_validate(data, root / "cache", root / "run", cfg, progress=False)
    return root / "run"


def summarise(name: str, results: list[Result], sources: dict[int, str]) -> None:
    """Counts per outcome (all, generated seeds, real seeds), generic messages, times."""
    print(f"\n{name}: {len(results)} cases")
    extra = ("generic", "noisy")
    print(f"{'seeds':<12}" + "".join(f"{o:>10}" for o in (*OUTCOMES, *extra)))
    for label in ("all", "generated", "real"):
        rs = [r for r in results if label == "all" or sources[r.case] == label]
        counts = Counter(r.outcome for r in rs)
        counts["generic"] = sum(r.detail.startswith("generic") for r in rs)
        counts["noisy"] = sum(bool(r.noise) for r in rs)
        print(f"{label:<12}" + "".join(f"{counts[o]:>10}" for o in (*OUTCOMES, *extra)))
    reasons = Counter(
        _kind_of(line)
        for r in results
        for line in r.detail.splitlines()
        if r.outcome in ("graded", "refused") and line
    )
    if reasons:
        print("files skipped or series refused, by reason (top 12):")
        for reason, n in reasons.most_common(12):
            print(f"  {n:>6}  {reason}")
    secs = [r.seconds for r in results]
    if secs:
        print(f"seconds a case: median {statistics.median(secs):.3f}, max {max(secs):.2f}")
    for r in results:
        if r.outcome in ("crashed", "hung") or r.detail.startswith("generic") or r.noise:
            said = r.detail.splitlines()[-1][:300] if r.detail else f"noise: {r.noise}"
            print(f"  case {r.case} {r.outcome}: {r.made} -> {said}")


def _kind_of(line: str) -> str:
    """The kind of a reason, without file names and numbers: ``pixel data holds N bytes``."""
    import re

    text = line.removeprefix("skipped: ").removeprefix("generic: ")
    if ": no usable DICOM image among" in text:  # a refused series: the first file's reason
        text = text.split(": ", 3)[-1]
    text = re.split(r"[(:;]", text, maxsplit=1)[0]
    return re.sub(r"\d+", "N", text).strip()[:70]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000, help="reader cases")
    ap.add_argument("--predict-cases", type=int, default=100, help="predict cases (a sample)")
    ap.add_argument("--seed", type=int, default=0, help="same seed, same cases")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case is hung")
    ap.add_argument("--workers", type=int, default=2, help="processes for the reader cases")
    ap.add_argument("--run", type=Path, default=None, help="trained run folder for predict")
    ap.add_argument(
        "--real", type=Path, default=REPO.parent / "shared" / "real" / "spider-t2space",
        help="SPIDER T2-SPACE folder (else the vendored tarball)",
    )  # fmt: skip
    ap.add_argument("--real-series", type=int, default=6, help="real series used as seeds")
    ap.add_argument("--keep", type=Path, default=None, help="copy crashed/hung cases here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_fuzz_"))
    try:
        seeds_gen = generated_seeds(tmp / "seeds")
        seeds_real = real_seeds(args.real if args.real.is_dir() else None, tmp / "seeds",
                                args.real_series)  # fmt: skip
        seeds = seeds_gen + seeds_real
        print(f"seeds: {len(seeds_gen)} generated ({', '.join(p.name for p in seeds_gen)}), "
              f"{len(seeds_real)} real ({seeds_real[0].parent})")  # fmt: skip
        real_names = {p.name for p in seeds_real}
        sources: dict[int, str] = {}
        bad: list[Result] = []

        def make(case: int) -> tuple[Path, dict]:
            folder = tmp / "cases" / f"case{case:05d}"
            made = make_case(np.random.default_rng([args.seed, case]), seeds, folder)
            sources[case] = "real" if made["seed"] in real_names else "generated"
            return folder, made

        def done(result: Result, folder: Path) -> None:
            if result.outcome in ("crashed", "hung"):
                bad.append(result)
                if args.keep is not None:
                    dst = args.keep / folder.name
                    shutil.copytree(folder, dst, dirs_exist_ok=True)
                    (dst / "case.json").write_text(json.dumps(asdict(result), indent=1))
            shutil.rmtree(folder, ignore_errors=True)

        t1 = time.perf_counter()
        pool = TimedWorkers(args.workers, "read", None, args.timeout)
        try:
            reader = pool.run(list(range(args.cases)), make, done)
        finally:
            pool.close()
        summarise(f"reader (read_series), {time.perf_counter() - t1:.0f} s", reader, sources)
        if args.predict_cases:
            run = args.run or train_tiny_run(tmp / "tiny")
            t2 = time.perf_counter()
            pool = TimedWorkers(1, "predict", run, max(args.timeout, 60.0))
            cases = list(range(args.cases, args.cases + args.predict_cases))
            try:
                predicted = pool.run(cases, make, done)
            finally:
                pool.close()
            summarise(f"predict, {time.perf_counter() - t2:.0f} s", predicted, sources)
        print(f"\ntotal {time.perf_counter() - t0:.0f} s; crashed or hung: {len(bad)}")
        return 1 if bad else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
