"""Command lines of the benches that take a design's config overrides after their options."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from bench_real_anatomy_seeds import parse_args


def test_seeds_bench_takes_overrides_after_its_options():
    # The form its docstring and BENCHMARKS.md give: options, then "--", then the design.
    args = parse_args(
        ["D", "C", "O", "--config", "default", "--seeds", "42", "7", "--jobs", "1", "--",
         "localizer.pretrained=false", "localizer.epochs=1"]
    )  # fmt: skip
    assert (str(args.data), str(args.cache), str(args.out)) == ("D", "C", "O")
    assert args.seeds == [42, 7] and args.jobs == 1 and args.config == "default"
    assert args.overrides == ["localizer.pretrained=false", "localizer.epochs=1"]
    bare = parse_args(["D", "C", "O"])
    assert bare.overrides == [] and bare.seeds == [42, 7, 11, 1, 2, 3]
