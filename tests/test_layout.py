"""The house by stage: each package imports only packages on lower floors of the pipeline.

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy import
that runs back up a floor is still a wrong room, only harder to see.
"""

from __future__ import annotations

import ast
from pathlib import Path

import spinegrade

PACKAGE = Path(spinegrade.__file__).parent

# Floors, lowest first. A module may import its own package and any package of a lower floor;
# packages that share a floor may not import each other, except on the ground floor (the torch
# runtime reads the config, the config writes atomically: no pipeline order among them).
FLOORS: list[set[str]] = [
    {"util", "task", "config", "__init__"},  # the ground: no pipeline stage
    {"io"},  # DICOM only
    {"rsna"},  # data contracts: the RSNA CSVs, folds, the submission format
    {"evaluation", "reporting"},  # metrics; figures and grades.json
    {"preprocessing"},  # the cache
    {"models"},  # networks and their weights
    {"localization"},  # stage 1
    {"data"},  # datasets and crops for both stages
    {"inference"},  # fold models -> graded studies; the run folder; predict
    {"training"},  # the loop, stages, cross-validation
    {"phantom", "serve"},  # the synthetic data generator; the clinical service
    {"demo"},  # the one-command demo
    {"cli"},  # the thin CLI over all of it
]
FLOOR = {room: k for k, rooms in enumerate(FLOORS) for room in rooms}


def room_of(module: str) -> str:
    """``spinegrade.training.cv`` -> ``training``; ``spinegrade.task`` -> ``task``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _module_or_root(name: str) -> str:
    """``spinegrade.x`` when x is a module or package, else the root package (``__version__``)."""
    is_module = (PACKAGE / f"{name}.py").is_file() or (PACKAGE / name).is_dir()
    return f"spinegrade.{name}" if is_module else "spinegrade"


def imports_of(path: Path, source: str) -> list[tuple[int, str]]:
    """Every spinegrade module ``path`` imports, with its line (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target == "spinegrade":  # `from spinegrade import x`: x may be a module
                found += [(node.lineno, _module_or_root(a.name)) for a in node.names]
            else:
                found.append((node.lineno, target))
    return [(line, m) for line, m in found if m == "spinegrade" or m.startswith("spinegrade.")]


def violations(extra: dict[str, str] | None = None) -> list[str]:
    """Imports that run up a floor, in the package plus ``extra`` (relative path -> source)."""
    sources = {p: p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    sources |= {PACKAGE / rel: text for rel, text in (extra or {}).items()}
    wrong = []
    for path, source in sources.items():
        mine = room_of(module_name(path))
        for line, target in imports_of(path, source):
            theirs = room_of(target)
            up = FLOOR[theirs] > FLOOR[mine] or (FLOOR[theirs] == FLOOR[mine] > 0)
            if theirs != mine and up:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} ({mine}) imports {target}")
    return wrong


def test_every_room_has_a_floor() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    rooms = modules | packages
    assert rooms - set(FLOOR) == set(), "a new package or module needs a floor in FLOORS"


def test_no_import_runs_up_a_floor() -> None:
    assert violations() == []


def test_the_checker_sees_an_import_running_up() -> None:
    """The rule bites: lazy or relative imports up a floor or across one are caught."""
    probe = {
        "data/probe.py": "def f():\n    from spinegrade.training.cv import cross_validate\n",
        "serve/probe.py": "from ..phantom import generate\n",
        "localization/probe.py": "from spinegrade import data\n",
    }
    assert sorted(violations(probe)) == [
        "data/probe.py:2 (data) imports spinegrade.training.cv",
        "localization/probe.py:1 (localization) imports spinegrade.data",
        "serve/probe.py:1 (serve) imports spinegrade.phantom",
    ]
