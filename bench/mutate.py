"""Does the suite notice? Switch off, one at a time, each mechanism the tests claim to test.

Every mutation is applied to a scratch copy of ``src/`` and ``tests/`` (the checkout is never
touched), then the tests that claim the mechanism run against that copy. A mutation the tests
catch is ``killed`` (good: they went red); one they miss ``SURVIVED`` (a test that cannot fail).
A mutation whose code no longer exists is an error: the table must follow the code. First the
same tests run on an unmutated copy (the control): a red there would make every ``killed`` mean
nothing, so it stops the check.

    .venv/bin/python bench/mutate.py [--only NAME ...] [--json OUT.json]
    make mutate

Prints a Markdown table (for BENCHMARKS.md, "Mutation check") and exits 1 when any survived.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    """One mechanism switched off: ``old`` replaced by ``new`` in ``path`` (exactly once)."""

    name: str
    path: str  # relative to the repository
    old: str
    new: str
    tests: tuple[str, ...]  # pytest node ids or files that claim the mechanism


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "DDP wrap",
        "src/spinegrade/training/engine.py",
        "train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)",
        "train_model = model  # mutation: each rank trains alone",
        ("tests/test_ddp.py",),
    ),
    Mutation(
        "checkpoint resume",
        "src/spinegrade/training/engine.py",
        "meta = load_checkpoint(ckpt_path, model, optimizer, average) if ckpt_path else None",
        "meta = None  # mutation: every rerun restarts the stage",
        ("tests/test_faults.py", "tests/test_train.py"),
    ),
    Mutation(
        "predict worker pool",
        "src/spinegrade/inference/predict.py",
        'if workers > 1 and len(ids) > 1 and predictor.device == "cpu":',
        "if False:  # mutation: --workers ignored",
        ("tests/test_predict.py",),
    ),
    Mutation(
        "folds side by side",
        "src/spinegrade/inference/ensemble.py",
        'n = min(n_folds, before) if device == "cpu" else 1',
        "n = 1  # mutation: one fold at a time",
        ("tests/test_predict.py",),
    ),
    Mutation(
        "atomic rename",
        "src/spinegrade/util/atomic.py",
        'tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")',
        "tmp = path  # mutation: written in place under its final name",
        ("tests/test_preprocess.py", "tests/test_faults.py", "tests/test_parallel.py"),
    ),
    Mutation(
        "strict weight loading",
        "src/spinegrade/models/weights.py",
        "result = model.load_state_dict(state, strict=strict)",
        "result = model.load_state_dict(state, strict=False)  # mutation",
        ("tests/test_models.py", "tests/test_predict.py"),
    ),
    Mutation(
        "any-severe loss term",
        "src/spinegrade/training/losses.py",
        '"loss": ce + any_severe_weight * any_term,',
        '"loss": ce,  # mutation: the any-severe term does not train',
        ("tests/test_losses.py",),
    ),
    Mutation(
        "any-severe metric term",
        "src/spinegrade/evaluation/metrics.py",
        'result["any_severe_spinal"] = _any_severe_term(sol, submitted[:, 2])',
        'result["any_severe_spinal"] = 0.0  # mutation',
        ("tests/test_metrics.py",),
    ),
    Mutation(
        "phantom caution",
        "src/spinegrade/inference/ensemble.py",
        "return [PHANTOM_CAUTION]",
        "return []  # mutation: no caution",
        ("tests/test_predict.py", "tests/test_report.py", "tests/test_serve.py"),
    ),
)


def scratch_copy(dest: Path) -> None:
    """``src/``, ``tests/`` and ``pyproject.toml`` of the checkout, without caches."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
    for part in ("src", "tests"):
        shutil.copytree(REPO / part, dest / part, ignore=ignore)
    shutil.copy2(REPO / "pyproject.toml", dest / "pyproject.toml")


def apply(m: Mutation, root: Path) -> None:
    path = root / m.path
    text = path.read_text()
    if text.count(m.old) != 1:
        raise SystemExit(
            f"mutation {m.name!r}: {m.path} holds {text.count(m.old)} copies of the code it "
            f"switches off (want 1): update bench/mutate.py to the code as it is now"
        )
    path.write_text(text.replace(m.old, m.new))


def run_tests(root: Path, tests: tuple[str, ...], timeout_s: float) -> tuple[str, float, str]:
    """(``killed`` | ``SURVIVED`` | ``timeout``, seconds, pytest's last line) on the copy."""
    env = dict(os.environ, PYTHONPATH=str(root / "src"), HF_HUB_OFFLINE="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"no result in {timeout_s:.0f} s"
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    outcome = "SURVIVED" if proc.returncode == 0 else "killed"
    if proc.returncode not in (0, 1):  # 2-5: interrupted, internal error, usage, no tests
        outcome = f"error (pytest exit {proc.returncode})"
    return outcome, time.perf_counter() - t0, last


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds a mutation's tests")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.only and len(chosen) != len(args.only):
        known = ", ".join(m.name for m in MUTATIONS)
        raise SystemExit(f"unknown mutation in {args.only}; known: {known}")
    tests = tuple(sorted({t for m in chosen for t in m.tests}))
    with tempfile.TemporaryDirectory(prefix="spinegrade-mutate-") as tmp:
        scratch_copy(Path(tmp))
        outcome, secs, last = run_tests(Path(tmp), tests, args.timeout)
    print(f"control (no mutation): {last} in {secs:.0f} s", file=sys.stderr, flush=True)
    if outcome != "SURVIVED":  # the unmutated tests must pass for a red to mean anything
        raise SystemExit(f"control run failed ({outcome}: {last}); fix the suite first")
    rows = []
    for m in chosen:
        with tempfile.TemporaryDirectory(prefix="spinegrade-mutate-") as tmp:
            root = Path(tmp)
            scratch_copy(root)
            apply(m, root)
            outcome, secs, last = run_tests(root, m.tests, args.timeout)
        rows.append({"mutation": m.name, "where": m.path.removeprefix("src/spinegrade/"),
                     "tests": " ".join(t.removeprefix("tests/") for t in m.tests),
                     "outcome": outcome, "seconds": round(secs, 1), "pytest": last})  # fmt: skip
        print(f"{m.name}: {outcome} in {secs:.0f} s ({last})", file=sys.stderr, flush=True)
    print("| mechanism switched off | where | tests run | outcome | s | pytest's last line |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mutation']} | `{r['where']}` | {r['tests']} | **{r['outcome']}** | "
              f"{r['seconds']:.0f} | {r['pytest']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    survived = [r["mutation"] for r in rows if r["outcome"] != "killed"]
    print(f"\n{len(rows) - len(survived)} of {len(rows)} mutations killed"
          + (f"; not killed: {', '.join(survived)}" if survived else ""))  # fmt: skip
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
