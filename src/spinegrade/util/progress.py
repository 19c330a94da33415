"""One progress bar for every long loop (studies, epochs, folds): tqdm on stderr.

Bars are shown unless the caller passes ``enabled=False`` (e.g. ``--no-progress``, or a DDP rank
other than 0) or the environment sets ``SPINEGRADE_PROGRESS=0`` (tests, batch jobs, logs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar, overload

# Plain tqdm, not tqdm.auto: the latter (tqdm.asyncio) calls iter() on its iterable when it is
# built, which on a DataLoader starts an extra epoch of workers and draws from the random stream,
# so results depended on whether a bar was shown.
from tqdm import tqdm

T = TypeVar("T")

ENV_VAR = "SPINEGRADE_PROGRESS"


def progress_enabled(enabled: bool = True) -> bool:
    """Whether a bar shows: the caller's flag and not ``SPINEGRADE_PROGRESS=0``."""
    return enabled and os.environ.get(ENV_VAR, "1").strip() != "0"


@overload
def progress_bar(
    iterable: Iterable[T],
    desc: str | None = None,
    *,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    **kwargs: Any,
) -> Iterable[T]: ...


@overload
def progress_bar(
    iterable: None = None,
    desc: str | None = None,
    *,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    **kwargs: Any,
) -> tqdm: ...


def progress_bar(
    iterable: Iterable[T] | None = None,
    desc: str | None = None,
    *,
    total: int | None = None,
    unit: str = "it",
    enabled: bool = True,
    leave: bool = True,
    **kwargs: Any,
) -> Iterable[T] | tqdm:
    """A tqdm bar over ``iterable``, or a manual one of ``total`` steps (``bar.update(1)``, usable
    as a context manager) when ``iterable`` is None.

    Disabled, an iterable comes back untouched and a manual bar prints nothing. ``kwargs`` go to
    tqdm unchanged (e.g. ``postfix``).
    """
    show = progress_enabled(enabled)
    if iterable is not None and not show:
        return iterable
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        leave=leave,
        disable=not show,
        dynamic_ncols=True,
        **kwargs,
    )
