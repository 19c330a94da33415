"""Interrupted commands stop their worker processes (no orphans left burning CPU)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spinegrade.util.parallel import exit_on_sigterm, process_pool

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of ``pid`` (forkserver workers are grandchildren)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                kids = [int(x) for x in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the timeout."""
    end = time.monotonic() + timeout
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def test_process_pool_terminates_busy_worker_on_error():
    ctx = mp.get_context("spawn")
    t0 = None
    with pytest.raises(RuntimeError, match="boom"), process_pool(1, ctx) as pool:
        pid = pool.submit(os.getpid).result(timeout=60)
        pool.submit(time.sleep, 60)  # a long task the block will not wait for
        pool.submit(time.sleep, 60)  # and a pending one, cancelled
        time.sleep(0.3)  # the worker is now asleep in the first task
        t0 = time.monotonic()
        raise RuntimeError("boom")
    assert time.monotonic() - t0 < 5
    assert _wait_gone([pid], 5) == []


def test_process_pool_normal_exit_waits_for_work():
    with process_pool(1, mp.get_context("spawn")) as pool:
        fut = pool.submit(time.sleep, 0.2)
    assert fut.done() and fut.exception() is None


def _ready_then_sleep(ready) -> None:
    ready.set()
    time.sleep(60)


def test_sigterm_raises_system_exit_and_forked_children_die():
    undo = exit_on_sigterm()
    try:
        ctx = mp.get_context("fork")
        ready = ctx.Event()
        child = ctx.Process(target=_ready_then_sleep, args=(ready,), daemon=True)
        child.start()  # inherits the handler: it must still die on SIGTERM, not raise
        try:
            assert ready.wait(10)
            child.terminate()
            child.join(5)
            assert child.exitcode == -signal.SIGTERM
        finally:
            child.kill()
        with pytest.raises(SystemExit) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode, well before this ends
        assert info.value.code == 128 + signal.SIGTERM
    finally:
        undo()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_stops_cli_and_its_workers(tmp_path):
    """`spinegrade synth --workers 2` killed by SIGTERM exits soon and leaves no worker running."""
    cmd = [sys.executable, "-m", "spinegrade.cli", "synth", str(tmp_path / "phantom")]
    cmd += ["--studies", "40", "--test-studies", "0", "--workers", "2"]
    env = dict(os.environ, SPINEGRADE_PROGRESS="0")
    err = tmp_path / "stderr.txt"
    with err.open("wb") as stderr:  # a pipe would stay open as long as any orphan lives
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    workers: list[int] = []
    try:
        end = time.monotonic() + 30
        # resource tracker + forkserver + 2 workers
        while len(workers) < 4 and time.monotonic() < end and proc.poll() is None:
            time.sleep(0.1)
            workers = _descendants(proc.pid)
        assert len(workers) >= 4, f"pool never started: {err.read_text()}"
        time.sleep(0.5)  # let the workers get into a study
        workers = _descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = proc.wait(timeout=10)
        assert rc == 128 + signal.SIGTERM, err.read_text()
        assert _wait_gone(workers, 5) == [], f"orphans after {time.monotonic() - t0:.1f} s"
        assert "interrupted" in err.read_text()
    finally:
        proc.kill()
        for pid in workers:  # only on failure: do not leave our own orphans behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
