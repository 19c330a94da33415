"""The fuzzing bench (#25), in small: a few dozen mutated series, and proof that it would see a
crash or a hang if there were one (zero of each is the goal, so zero must be able to fail)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_fuzz


def test_a_few_dozen_mutated_series_are_graded_or_refused(capsys) -> None:
    code = bench_fuzz.main(["--cases", "40", "--predict-cases", "0", "--workers", "1",
                            "--real-series", "2", "--timeout", "60"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    row = next(line.split() for line in out.splitlines() if line.startswith("all "))
    graded, refused, crashed, hung = (int(v) for v in row[1:5])
    assert graded + refused == 40 and crashed == hung == 0, out
    assert "by reason" in out  # the mutations reached the reader's checks


def test_the_bench_counts_a_hang_a_dead_worker_and_a_logged_traceback(tmp_path: Path) -> None:
    from hostile_corpus import write_series

    seed = tmp_path / "seed"
    write_series(seed, "1.2.3.4", n=2)
    names = ["fine", "hang", "die", "raise", "after"]
    pool = bench_fuzz.TimedWorkers(1, "probe", None, timeout=5.0)
    results = []

    def make(case: int) -> tuple[Path, dict]:
        folder = tmp_path / f"case_{names[case]}"
        shutil.copytree(seed, folder)
        return folder, {"name": names[case]}

    try:
        results = pool.run(list(range(len(names))), make, lambda r, f: shutil.rmtree(f))
    finally:
        pool.close()
    outcomes = {r.made["name"]: r.outcome for r in results}
    assert outcomes == {"fine": "graded", "hang": "hung", "die": "crashed", "raise": "crashed",
                        "after": "graded"}  # fmt: skip
    assert not list(tmp_path.glob("case_*"))


def test_mutations_are_fixed_by_the_seed(tmp_path: Path) -> None:
    from hostile_corpus import write_series

    seeds = [tmp_path / "s"]
    write_series(seeds[0], "1.2.3.4", n=3)
    made = []
    for k in range(2):
        folder = tmp_path / f"c{k}"
        how = bench_fuzz.make_case(np.random.default_rng([7, 1]), seeds, folder)
        made.append((how, {p.name: p.read_bytes() for p in folder.iterdir()}))
    assert made[0] == made[1]
    original = {p.name: p.read_bytes() for p in seeds[0].iterdir()}
    assert made[0][1] != original  # and they do change something
