"""Process pools that never outlive an interrupted command.

``ProcessPoolExecutor.__exit__`` waits for the work in flight, and a parent killed by SIGTERM
leaves its workers behind (they finish their task, then wait forever for the next one).
:func:`process_pool` terminates the workers when its block ends by an exception (an error,
Ctrl-C, ``SystemExit``), and :func:`exit_on_sigterm` turns SIGTERM into ``SystemExit`` so that
this cleanup and every ``finally`` block run.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

_GRACE_S = 2.0  # after SIGTERM, a worker gets this long to die before SIGKILL


@contextmanager
def process_pool(
    workers: int, context: BaseContext | None = None, **kwargs: Any
) -> Iterator[ProcessPoolExecutor]:
    """A ``ProcessPoolExecutor`` whose workers die with the block (``kwargs`` go to the pool,
    except ``initializer``, which this sets).

    A normal exit waits for the submitted work, as ``with ProcessPoolExecutor()`` does. An exit
    by any exception, ``KeyboardInterrupt`` and ``SystemExit`` included, cancels pending work
    and terminates the workers instead of waiting for them, then re-raises. Workers ignore
    SIGINT (Ctrl-C reaches the whole process group; the parent stops them) and die on SIGTERM.
    """
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_signals, **kwargs)
    try:
        yield pool
        pool.shutdown(wait=True)
    except BaseException:
        _stop_workers(pool)
        raise


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = _GRACE_S) -> None:
    """Cancel the pool's pending work and terminate (then, if need be, kill) its workers."""
    processes = _worker_processes(pool)
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join(grace_s)
    if processes:
        log.debug("stopped %d worker process(es)", len(processes))


def _worker_processes(pool: ProcessPoolExecutor) -> list[BaseProcess]:
    """The pool's worker processes.

    Private API: Python < 3.14 has no ``ProcessPoolExecutor.terminate_workers()``, so this reads
    ``_processes`` (pid -> Process, None once the pool is shut down); the one place that does.
    """
    processes = getattr(pool, "_processes", None) or {}
    return list(processes.values())


def _worker_signals() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle; SIGTERM kills (as by default), even
    in a forked worker that inherited the parent's :func:`exit_on_sigterm` handler."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def exit_on_sigterm() -> Callable[[], None]:
    """Make SIGTERM raise ``SystemExit(143)`` in this (main) thread; returns an undo function.

    The exception unwinds the command like Ctrl-C does, so :func:`process_pool` stops its workers
    and ``finally`` blocks run. A second SIGTERM during that cleanup kills at once (the default
    action). A forked child that inherits the handler behaves as if it had never been installed.
    Handlers belong to the main thread: called from another thread, this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # only the main thread may set handlers (e.g. an app in a thread)
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signum, signal.SIG_DFL)
        if os.getpid() != owner:  # a forked child: die as by default
            os.kill(os.getpid(), signum)
            return
        log.warning("interrupted by %s: stopping workers, exiting", signal.Signals(signum).name)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)

    def undo() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return undo
