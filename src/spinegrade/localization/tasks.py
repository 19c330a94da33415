"""Which stage-1 nets a run trains: one per sagittal series type, each with its targets."""

from __future__ import annotations

from dataclasses import dataclass

from spinegrade.config import Config, ConfigError
from spinegrade.task import CONDITIONS, LEVELS, SAG_T1, SAG_T2

SPINAL, LEFT_FOR, RIGHT_FOR = CONDITIONS[0], CONDITIONS[1], CONDITIONS[2]


@dataclass(frozen=True)
class LocalizerTask:
    """One stage-1 network: which series it reads and which (condition, level) points it finds."""

    name: str
    description: str
    targets: tuple[tuple[str, str], ...]


LOCALIZER_TASKS: dict[str, LocalizerTask] = {
    "spinal": LocalizerTask("spinal", SAG_T2, tuple((SPINAL, lv) for lv in LEVELS)),
    "foraminal": LocalizerTask(
        "foraminal", SAG_T1, tuple((c, lv) for c in (LEFT_FOR, RIGHT_FOR) for lv in LEVELS)
    ),
}


def configured_tasks(cfg: Config) -> dict[str, LocalizerTask]:
    """The stage-1 tasks ``cfg.localizer.tasks`` asks for; a clear error for an unknown name."""
    names = list(cfg.localizer.tasks)
    unknown = [n for n in names if n not in LOCALIZER_TASKS]
    if unknown or not names:
        raise ConfigError(
            f"localizer.tasks={names!r}: give one or more of {sorted(LOCALIZER_TASKS)}"
        )
    return {n: t for n, t in LOCALIZER_TASKS.items() if n in names}
