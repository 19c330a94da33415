"""DDP on CPU (gloo): a 2-rank fold matches a 1-process fold step for step, and a lost rank fails
the survivor with a clear error instead of hanging. Ranks run in real processes (torchrun)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from spinegrade.config import load_config
from spinegrade.training.cv import cross_validate
from stack_factory import write_world
from tiny_config import TINY_RUN

SRC = Path(__file__).resolve().parents[1] / "src"
# 8 studies, 2 folds: 4 validation studies a fold. Batches divisible by 2 ranks (the grader's
# batch is counted in studies: 10 crops -> 2 studies, 1 a rank).
# write_world's cache declares the quick grid (256 px) in its manifest, so the run must match it.
DDP_RUN = [*TINY_RUN, "data.n_folds=2", "localizer.batch_size=4", "train.ddp_timeout_s=30",
           "data.cache_size=256"]  # fmt: skip

NETWORKS = ["grader_foraminal", "grader_spinal", "grader_subarticular", "localizer_foraminal",
            "localizer_spinal"]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(SRC), SPINEGRADE_PROGRESS="0", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1", **extra)  # fmt: skip
    return env


def _train_args(data: Path, cache: Path, run: Path) -> list[str]:
    return ["-m", "spinegrade.cli", "train", str(data), "--cache", str(cache), "--out", str(run),
            "--folds", "0", "--no-progress", *DDP_RUN, "train.strategy=ddp"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("ddp_world"), n_studies=8)


def test_two_ranks_train_a_complete_fold_like_one_process(world, tmp_path):
    data, cache = world
    ddp_run, one_run = tmp_path / "ddp", tmp_path / "one"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           *_train_args(data, cache, ddp_run)]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Every rank left the process group before exiting (gloo threads outliving the interpreter
    # abort a finished rank, at random).
    assert "terminate called" not in done.stderr, done.stderr[-3000:]
    cross_validate(data, cache, one_run, load_config("quick", DDP_RUN), [0], progress=False)

    folds = pd.read_csv(ddp_run / "folds.csv")
    val = set(folds.loc[folds["fold"] == 0, "study_id"])
    fold = ddp_run / "fold_0"
    oof = pd.read_csv(fold / "oof.csv")
    graded = [int(r.split("_")[0]) for r in oof["row_id"]]
    # Every validation study exactly once (25 rows each), none from training.
    assert set(graded) == val and len(oof) == 25 * len(val) and oof["row_id"].is_unique
    # Every network of the fold, with its sidecar, as a one-process fold writes them.
    weights = sorted(p.name for p in fold.glob("*.safetensors"))
    assert weights == sorted(p.name for p in (one_run / "fold_0").glob("*.safetensors"))
    assert weights == [f"{n}.safetensors" for n in NETWORKS]
    assert all((fold / f"{n}.json").is_file() for n in NETWORKS)
    assert (fold / "localizer_errors.csv").is_file() and not (fold / "checkpoints").exists()

    ddp, one = (json.loads((r / "fold_0" / "metrics.json").read_text()) for r in (ddp_run, one_run))
    assert ddp["runtime"]["world_size"] == 2 and one["runtime"]["world_size"] == 1
    assert ddp["runtime"]["device"] == one["runtime"]["device"] == "cpu"
    steps = ddp["runtime"]["steps_per_epoch"]
    assert steps == one["runtime"]["steps_per_epoch"] and steps["grader_spinal"] >= 2
    log = [json.loads(x) for x in (fold / "log.jsonl").read_text().splitlines()]
    assert log[0]["event"] == "runtime" and log[0]["world_size"] == 2
    epochs = [r for r in log if "steps" in r]
    assert epochs and all(r["world_size"] == 2 for r in epochs)
    one_log = [json.loads(x) for x in (one_run / "fold_0" / "log.jsonl").read_text().splitlines()]
    one_epochs = [r for r in one_log if "steps" in r]
    assert [_at(r) for r in epochs] == [_at(r) for r in one_epochs]
    assert {r["stage"] for r in epochs} == set(NETWORKS)
    # One model, not one per rank: after every epoch both ranks hold bit-identical parameters.
    # (Without the DDP wrap each rank would train its own replica on its half of the batches.)
    shas = [r["param_sha"] for r in epochs]
    assert all(len(sha) == 2 and sha[0] == sha[1] for sha in shas), shas
    # ... and the digest tells models apart: each stage's network is a different one.
    assert len({sha[0] for sha in shas}) == len(shas), shas
    assert all(len(r["param_sha"]) == 1 for r in one_epochs)
    # The same global batches over the same data: the two folds' scores stay close (DDP averages
    # per-rank means of class-weighted losses, and dropout draws differ, so not bit-identical).
    assert abs(ddp["oof"]["score"] - one["oof"]["score"]) < 0.05


def _at(record: dict) -> tuple[str, int]:
    return record["stage"], record["epoch"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_rank_that_dies_fails_the_other_with_a_clear_error(world, tmp_path):
    # Two ranks started as torchrun would (one per node: no agent would kill the survivor);
    # rank 1 dies after its first localiser epoch, before the end-of-epoch barrier.
    data, cache = world
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
              "LOCAL_RANK": "0", "SPINEGRADE_TEST_DIE": "localizer_spinal:epoch:1"}  # fmt: skip
    args = [sys.executable, *_train_args(data, cache, tmp_path / "run"), "train.ddp_timeout_s=8"]
    procs = [
        subprocess.Popen(
            args,
            env=_env(**common, RANK=str(r)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    try:
        dead = procs[1].communicate(timeout=120)
        t_death = time.perf_counter()
        outs = [procs[0].communicate(timeout=60), dead]
        waited = time.perf_counter() - t_death  # the survivor's time after the death
    finally:
        for p in procs:
            p.kill()
    assert procs[1].returncode == 17  # the injected death
    assert procs[0].returncode not in (0, None)
    err = outs[0][1]
    assert "DistributedFailure" in err and "lost the other ranks" in err, err[-2000:]
    assert "ddp_timeout_s" in err
    assert waited < 8 + 10, waited  # within the timeout (8 s), plus the exit


@pytest.mark.parametrize(("n", "batch", "world"), [(11, 4, 2), (10, 4, 2), (9, 6, 3), (3, 4, 2),
                                                    (40, 8, 4), (7, 10, 2)])  # fmt: skip
def test_ranks_split_each_one_process_batch_without_padding(n, batch, world):
    from spinegrade.data.epoch import EpochDataset
    from spinegrade.training.batches import _GlobalBatches

    class Items(EpochDataset):
        def __len__(self) -> int:
            return n

    data = Items()
    data.set_epoch(3)
    one = list(_GlobalBatches(data, 5, batch, 0, 1))
    ranks = [list(_GlobalBatches(data, 5, batch, r, world)) for r in range(world)]
    assert all(len(r) == len(one) == len(_GlobalBatches(data, 5, batch, 0, world)) for r in ranks)
    for step, whole in enumerate(one):
        parts = [r[step] for r in ranks]
        assert all(parts)  # no rank ever gets an empty step (DDP would wait for it)
        # The ranks' rows of a step are the one-process batch, each sample once.
        assert sorted(i for p in parts for i in p) == sorted(whole)
