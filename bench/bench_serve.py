"""Throughput of `spinegrade serve` through its whole loop against a local Orthanc, and the
latency it adds over `spinegrade predict` on the same studies.

    .venv/bin/python bench/bench_serve.py RUN_DIR DATA_DIR [--studies 4]
    .venv/bin/python bench/bench_serve.py --train   # trains a tiny run on phantom data first

DATA_DIR holds an RSNA layout (test_images/). The chosen studies are uploaded to a private
Orthanc (LocalOrthanc: loopback, temp storage), the loop grades them (discover via the change
feed, WADO-RS retrieve, predict, SR + SC built, validated and stored with STOW-RS), and the same
studies are then predicted from disk with `predict()` and the same loaded ensemble. The loop is
polled until every uploaded study is graded or ``--timeout`` passes; rates divide by the studies
actually graded (never by those uploaded), and the studies not graded are listed with their
state and reason. Prints studies/minute, the per-study loop split (retrieve / predict / store)
and the added seconds (only when every study was graded: otherwise the two runs did not do the
same work).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

from spinegrade.inference.ensemble import Predictor
from spinegrade.inference.predict import predict
from spinegrade.serve.orthanc import LocalOrthanc
from spinegrade.serve.service import Service, load_serve_config

# The tests' tiny run (one home for it): the loop's cost is measured, not accuracy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_config import TINY_RUN as TINY


def train_tiny(root: Path, n_test: int) -> tuple[Path, Path]:
    from spinegrade.config import load_config
    from spinegrade.phantom import generate_dataset
    from spinegrade.preprocessing.build import preprocess_dataset
    from spinegrade.training.cv import cross_validate

    data = root / "data"
    generate_dataset(data, n_train=4, n_test=n_test, seed=11, workers=1)
    cfg = load_config("quick", TINY)
    preprocess_dataset(data, root / "cache", "train", size=cfg.data.cache_size, progress=False)
    cross_validate(data, root / "cache", root / "run", cfg, progress=False)
    return root / "run", data


SPLIT = ("retrieve", "predict", "store")


def grade_until_done(svc, n: int, timeout_s: float, pause_s: float = 0.5) -> tuple[float, int]:
    """Poll ``svc`` until ``n`` studies are graded or ``timeout_s`` passes.

    Returns the seconds from the first poll to the end of the last poll that graded a study (the
    loop's time for the studies graded; idle polls after it are not counted), and the polls made.
    """
    t0 = time.perf_counter()
    last, polls = 0.0, 0
    while True:
        counts = svc.poll_once()
        polls += 1
        if counts["graded"]:
            last = time.perf_counter() - t0
        done = sum(r.status == "graded" for r in svc.state.all())
        if done >= n or time.perf_counter() - t0 > timeout_s:
            return last, polls
        time.sleep(pause_s)


def summary(
    uploaded: int,
    loop_s: float,
    polls: int,
    split: np.ndarray,
    predict_s: float,
    not_graded: list[str],
    timeout_s: float,
    setup: str,
) -> list[str]:
    """The printed lines: every rate is over the studies graded (``len(split)``), not uploaded.

    ``not_graded``: one "status: reason" for each study the service saw but did not grade; the
    uploaded studies it never saw are the rest. The comparison with ``predict`` (which ran on all
    ``uploaded`` studies) is printed only when every study was graded.
    """
    graded = len(split)
    missing = uploaded - graded
    lines = [f"studies: {uploaded} uploaded, {graded} graded, {missing} not graded "
             f"(polled {polls}x, timeout {timeout_s:.0f} s); {setup}"]  # fmt: skip
    if missing:
        unseen = missing - len(not_graded)
        lines += [f"  not graded: {reason}" for reason in not_graded]
        if unseen > 0:
            lines.append(f"  not graded: {unseen} never seen by the service (not discovered)")
    if not graded:
        lines.append("serve loop: no study graded, nothing measured")
        return lines
    lines += [
        f"serve loop: {loop_s:.1f} s for {graded} graded = {60 * graded / loop_s:.1f} studies/min "
        f"({loop_s / graded:.2f} s/study, discovery included)",
        "per graded study, mean: retrieve {:.2f} s, predict+report {:.2f} s, SR/SC build+store "
        "{:.2f} s".format(*split.mean(axis=0)),
        f"spinegrade predict on the {uploaded} studies (with reports): {predict_s:.1f} s = "
        f"{predict_s / uploaded:.2f} s/study",
    ]  # fmt: skip
    if missing:
        lines.append(f"added by serve: not compared ({missing} of {uploaded} studies not graded)")
    else:
        lines.append(f"added by serve: {(loop_s - predict_s) / graded:+.2f} s/study "
                     f"({loop_s / predict_s:.2f}x predict)")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", nargs="?")
    ap.add_argument("data_dir", nargs="?")
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--train", action="store_true", help="train a tiny run on phantom data")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=300.0,
                    help="seconds to keep polling for studies not graded yet")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    try:
        if args.train or not args.run_dir:
            run, data = train_tiny(tmp / "train", args.studies)
        else:
            run, data = Path(args.run_dir), Path(args.data_dir)
        studies = sorted((data / "test_images").iterdir())[: args.studies]
        predictor = Predictor.from_run_dir(run, device=args.device)
        with LocalOrthanc(tmp / "orthanc") as pacs:
            for s in studies:
                pacs.upload_folder(s)
            time.sleep(2.0)  # Orthanc's StableAge (1 s): the change feed reports stable studies
            cfg = load_serve_config(
                pacs_url=pacs.dicomweb_url, pacs_user=pacs.user, pacs_password=pacs.password,
                token="bench", work_dir=str(tmp / "serve"), device=args.device,
            )  # fmt: skip
            svc = Service(run, cfg, predictor=predictor)
            loop_s, polls = grade_until_done(svc, len(studies), args.timeout)
        rows = svc.state.all()
        graded = [r for r in rows if r.status == "graded"]
        split = np.array([[r.result["timings_s"][k] for k in SPLIT] for r in graded])
        not_graded = [f"{r.status}: {r.reason or 'no reason recorded'}" for r in rows
                      if r.status != "graded"]  # fmt: skip
        # The same studies from disk through predict(), the ensemble already loaded.
        layout = tmp / "layout"
        for s in studies:
            shutil.copytree(s, layout / "test_images" / s.name)
        src_csv = data / "test_series_descriptions.csv"
        desc = pd.read_csv(src_csv)
        desc[desc["study_id"].isin([int(s.name) for s in studies])].to_csv(
            layout / "test_series_descriptions.csv", index=False
        )
        t1 = time.perf_counter()
        predict(
            run,
            layout,
            tmp / "out" / "submission.csv",
            report_dir=tmp / "out" / "report",
            cache_dir=tmp / "pcache",
            device=args.device,
            progress=False,
            predictor=predictor,
        )
        predict_s = time.perf_counter() - t1  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = summary(
        len(studies), loop_s, polls, split, predict_s, not_graded, args.timeout,
        f"threads {args.threads}, device {args.device}",
    )  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
