"""`spinegrade serve` under faults: many studies at once and the process killed at random points.

    .venv/bin/python bench/bench_serve_faults.py [--studies 50] [--kills 5] [--seed 0]

Trains the tests' tiny run on phantom data (~30 s), starts a private Orthanc (LocalOrthanc),
uploads ``--studies`` copies of the phantom test studies under new UIDs all at once, and runs
`spinegrade serve` as a child process. ``--kills`` times, at a seeded random moment, the child is
killed with SIGKILL (no handler runs, as in a power cut or the OOM killer) and started again on
the same work folder; after the last kill it runs until every study is graded or ``--timeout``
passes. Meanwhile the worklist's JSON is asked every second and the slowest answer is kept.

Counts are asked of Orthanc itself (SR and SC instances per study), never of the service's
state: graded exactly once (one SR and one SC), lost (no SR), duplicated (more than one SR or
SC). "Resumed" counts the studies a kill caught mid-grading (the restarts' log lines); each must
still end with one SR on the PACS.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import requests
import yaml

from spinegrade.serve.orthanc import LocalOrthanc, free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_serve import train_tiny
from serve_helpers import copy_study, instances_in_orthanc

TOKEN = "bench-faults"


def start_serve(run: Path, config: Path, log) -> subprocess.Popen:
    env = {**os.environ, "SPINEGRADE_TOKEN": TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "spinegrade.cli", "serve", str(run), "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


def graded_count(db: Path) -> int:
    if not db.is_file():
        return 0
    with sqlite3.connect(db) as con:
        return int(con.execute("SELECT COUNT(*) FROM studies WHERE status='graded'").fetchone()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=50)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kill-window", type=float, nargs=2, default=(8.0, 40.0),
                    help="seconds after a (re)start between which the kill falls")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_faults_"))
    run, data = train_tiny(tmp / "train", 3)
    phantoms = sorted((data / "test_images").iterdir())
    with LocalOrthanc(tmp / "orthanc") as pacs:
        uids = []
        for k in range(args.studies):
            folder = tmp / "studies" / f"s{k:03d}"
            uids.append(copy_study(phantoms[k % len(phantoms)], folder, f"bench-{args.seed}-{k}"))
        t_up = time.perf_counter()
        for k in range(args.studies):  # all at once: the loop has not started yet
            pacs.upload_folder(tmp / "studies" / f"s{k:03d}")
        print(f"uploaded {args.studies} studies in {time.perf_counter() - t_up:.1f} s")
        port, work = free_port(), tmp / "work"
        config = tmp / "serve.yaml"
        config.write_text(yaml.safe_dump({
            "pacs_url": pacs.dicomweb_url, "pacs_user": pacs.user, "pacs_password": pacs.password,
            "work_dir": str(work), "port": port, "poll_s": 1.0, "backoff_s": 5.0, "device": "cpu",
        }))  # fmt: skip
        log = open(tmp / "serve.log", "ab")  # noqa: SIM115 (the children's shared log)
        url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {TOKEN}"}
        kills, slowest, answers = [], 0.0, 0
        t0 = time.monotonic()
        child = start_serve(run, config, log)
        kill_at = time.monotonic() + rng.uniform(*args.kill_window)
        try:
            while time.monotonic() - t0 < args.timeout:
                time.sleep(1.0)
                try:
                    t = time.perf_counter()
                    requests.get(f"{url}/api/studies", headers=auth, timeout=30).raise_for_status()
                    slowest, answers = max(slowest, time.perf_counter() - t), answers + 1
                except requests.ConnectionError:
                    pass  # between a kill and the page being up again
                done = graded_count(work / "state.db")
                if len(kills) < args.kills and time.monotonic() >= kill_at:
                    child.send_signal(signal.SIGKILL)
                    child.wait()
                    kills.append((round(time.monotonic() - t0, 1), done))
                    child = start_serve(run, config, log)
                    kill_at = time.monotonic() + rng.uniform(*args.kill_window)
                elif len(kills) == args.kills and done == args.studies:
                    break
        finally:
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
            log.close()
        wall = time.monotonic() - t0
        srs = [instances_in_orthanc(pacs, u, "SR") for u in uids]
        scs = [instances_in_orthanc(pacs, u, "OT") for u in uids]
    text = (tmp / "serve.log").read_text(errors="replace")
    once = sum(len(a) == 1 and len(b) == 1 for a, b in zip(srs, scs, strict=True))
    lost = sum(len(a) == 0 for a in srs)
    duplicated = sum(len(a) > 1 or len(b) > 1 for a, b in zip(srs, scs, strict=True))
    print(f"sent {args.studies}, graded exactly once (one SR + one SC in Orthanc) {once}, "
          f"lost {lost}, duplicated {duplicated}")  # fmt: skip
    resumed = sum(int(n) for n in re.findall(r"resumed (\d+) study", text))
    print(f"SIGKILLs {len(kills)} at (s, studies graded then): {kills}; studies caught mid-grading "
          f"and resumed after a restart: {resumed}")  # fmt: skip
    print(f"wall {wall:.0f} s; worklist JSON answered {answers} times, slowest {slowest:.2f} s")
    if args.keep:
        print(f"kept: {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
