"""The one progress helper: tqdm bars that callers and SPINEGRADE_PROGRESS=0 can silence."""

from __future__ import annotations

import io

import pytest

from spinegrade.util.progress import progress_bar, progress_enabled


def test_a_disabled_bar_hands_back_the_iterable_and_a_silent_manual_bar(monkeypatch):
    monkeypatch.delenv("SPINEGRADE_PROGRESS", raising=False)
    items = [1, 2, 3]
    # Untouched, so wrapping a DataLoader costs nothing when no bar is shown.
    assert progress_bar(items, "x", enabled=False) is items
    monkeypatch.setenv("SPINEGRADE_PROGRESS", "0")
    assert progress_bar(items, "x") is items and not progress_enabled(True)
    err = io.StringIO()
    with progress_bar(total=3, unit="study", file=err) as bar:  # callers still update/close it
        bar.update(2)
    assert bar.disable and err.getvalue() == ""


@pytest.mark.parametrize("env", [None, "1"])
def test_an_enabled_bar_draws_and_yields_every_item(monkeypatch, env):
    if env is None:
        monkeypatch.delenv("SPINEGRADE_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("SPINEGRADE_PROGRESS", env)
    out = io.StringIO()
    assert list(progress_bar(range(4), "loading", unit="study", file=out)) == [0, 1, 2, 3]
    assert "loading" in out.getvalue() and "4/4" in out.getvalue()
