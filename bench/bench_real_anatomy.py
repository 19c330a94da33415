"""Does the localiser find real discs? A run's spinal localiser on real sagittal T2 series.

    .venv/bin/python bench/bench_real_anatomy.py RUN_DIR [REAL_DIR] [--folds 0] [--out DIR]

REAL_DIR (default ``../shared/real/spider-t2space`` relative to the repository) holds
``series/<case_id>/*.dcm`` and ``truth.csv`` (disc centres L1/L2..L5/S1 in patient LPS mm), e.g.
the SPIDER T2-SPACE validation set (CC BY 4.0, see its README). It is for validation only: never
train on it or tune the phantom against its figures.

Every series is read and cached as ``predict`` does (``io.read_series`` -> ``cache_series``) and
located by every chosen fold's localiser. Each fold's points are scored (what its out-of-fold
grading saw; pooled over folds) and, with several folds, their consensus
(``localize.localize_consensus``: where prediction grades; the folds' zoomed looks are centred
where their whole looks agree, then their points combined by median). The
located spinal point lies in the canal, ~2 cm behind its disc centre, so it is scored by its
distance to the disc's mid-plane along the local spine axis (the tangent of the curve through
the disc centres, :func:`spine_axes`), not by the 3D distance. A level is "misnamed" when it
lies nearer another disc's mid-plane than its own. Prints per level and overall: median and
90th percentile distance, the share within 5 and 10 mm, and misnamed levels; writes a PNG per
case (mid slice, truth = circles, located = crosses: the consensus, or the one fold) to ``--out``.

``--crop top|bottom|both`` re-frames every real series before it is located: the field is cut
``--margin`` mm above L1/L2 (top: the thoracic spine leaves the field), below L5/S1 (bottom: the
sacrum is cut at the edge) or both, as sites with smaller or differently centred fields acquire
them. The truth only places the cut; the localiser sees a real image with a real field edge.
A localiser that names levels by where they sit in the field, or by counting discs from its
top, fails here; one that reads the anatomy does not.

``--also-as-t1`` gives each study its T2 series a second time, as the sagittal T1 series, so
that the foraminal net reads it and the canal/foramina fusion runs (``--fuse-lead`` overrides
the run's lead). It is a proxy for a real study with both series where the foraminal net never
saw real images (the demo's: SPIDER has no T1): a net on a real image of a contrast it never
learned. No real T1 is needed.

``--held-out`` runs each fold's localiser on the real cases that fold did not train on (a run
that trained on the real set too, as ``--oof``), so that test-time settings (``--vote-mm``,
``--zoom``, ``--decoder``) can be measured out of fold without retraining.

``--oof`` scores the run's own out-of-fold points instead (``RUN_DIR/oof_points.csv``: every
study a fold did not train on, located by that fold), for runs that trained on the real set too
(`spinegrade import spider`, then `train PHANTOM SPIDER ...`): the imported studies are matched to
REAL_DIR's cases through their data folder's ``cases.csv``, no model is run, and the located
disc centres are scored by their 3D distance to the true ones as well. Only out-of-fold points
count on a set the run trained on.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

from spinegrade.evaluation.anatomy import misnamed, score_case, summarise
from spinegrade.inference.ensemble import run_folds
from spinegrade.inference.fold_models import load_fold_models
from spinegrade.inference.run_folder import fold_dir, load_run_config
from spinegrade.io import read_series
from spinegrade.localization.localize import localize_consensus, localize_study
from spinegrade.localization.localizer import DECODERS
from spinegrade.preprocessing.series import CacheParams, cache_series
from spinegrade.task import LEVELS, SAG_T1, SAG_T2, TITLE_TO_LEVEL

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the repository (a worktree one level deeper finds it one folder further up)
_CANDIDATES = [base / "shared" / "real" / "spider-t2space" for base in REPO.parents[:2]]
DEFAULT_REAL = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


def by_quartile(df: pd.DataFrame, values: dict[str, float], name: str) -> pd.DataFrame:
    """The scores by quartile of a per-case value (``name`` heads its column).

    ``shift_upper_mm``: mean signed distance of L1/L2..L4/L5 (negative: towards the feet).
    """
    d = df.assign(value=df["case"].map(values))
    d["q"] = pd.qcut(d["value"], 4, duplicates="drop")
    out = []
    for q, g in d.groupby("q", observed=True):
        a = g["dist_mm"].abs()
        out.append(
            {
                name: f"{q.left:.0f} to {q.right:.0f}",
                "cases": g["case"].nunique(),
                "within_5mm": (a <= 5).mean(),
                "misnamed": int(misnamed(g).sum()),
                "shift_upper_mm": g.loc[g["level"] != LEVELS[-1], "dist_mm"].mean(),
            }
        )
    return pd.DataFrame(out)


def field_height(stack, centres: np.ndarray) -> float:
    """How far (mm) the middle of the lumbar discs lies above the middle of the field.

    Halfway between L1/L2 and L5/S1, measured along the image rows towards the head. The phantom
    places its fields around L3/L4 within a few centimetres; a localiser that learned where the
    levels sit in the field, rather than what they look like, fails on spines placed otherwise.
    """
    rows = (centres[[0, -1]] - stack.positions[0]) @ stack.col_dir / stack.spacing[0]
    head_up = stack.col_dir[2] < 0  # rows run towards the feet (LPS z falls)
    offset = (stack.volume.shape[1] - 1) / 2 - rows.mean()
    return float(offset * stack.spacing[0] * (1 if head_up else -1))


def crop_field(stack, centres: np.ndarray, margin: float, edges: str):
    """The stack with its rows cut ``margin`` mm beyond the end discs at the ``edges`` given
    (top = superior edge, bottom = inferior, both); a field edge already nearer stays."""
    rows = (centres - stack.positions[0]) @ stack.col_dir / stack.spacing[0]  # row of each disc
    n_rows = stack.volume.shape[1]
    pad = margin / stack.spacing[0]
    # Rows run towards the feet when the column direction points inferior (LPS z falls).
    inferior_down = stack.col_dir[2] < 0
    first, last = (rows[0], rows[-1]) if inferior_down else (rows[-1], rows[0])
    upper_edge, lower_edge = edges in ("top", "both"), edges in ("bottom", "both")
    cut_first, cut_last = (upper_edge, lower_edge) if inferior_down else (lower_edge, upper_edge)
    lo = max(0, int(np.floor(first - pad))) if cut_first else 0
    hi = min(n_rows, int(np.ceil(last + pad)) + 1) if cut_last else n_rows
    h0, w0 = stack.orig_shape
    return dataclasses.replace(
        stack,
        volume=np.ascontiguousarray(stack.volume[:, lo:hi]),
        positions=stack.positions + lo * stack.spacing[0] * stack.col_dir,
        orig_shape=(max(1, round(h0 * (hi - lo) / n_rows)), w0),
    )


def draw_case(path: Path, stack, truth_lps: np.ndarray, located: np.ndarray) -> None:
    """Mid slice (the one nearest the truth points) with truth circles and located crosses."""
    from PIL import Image, ImageDraw

    z_t = np.array([stack.patient_to_voxel(p)[0] for p in truth_lps])
    k = int(np.clip(np.rint(np.median(z_t)), 0, stack.volume.shape[0] - 1))
    img = Image.fromarray(stack.volume[k]).convert("RGB")
    draw = ImageDraw.Draw(img)
    colours = [(0, 200, 255), (40, 220, 120), (255, 230, 0), (255, 150, 0), (255, 60, 60)]
    for j in range(len(LEVELS)):
        _, y, x = stack.patient_to_voxel(truth_lps[j])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colours[j], width=2)
        if np.isfinite(located[j]).all():
            _, y, x = stack.patient_to_voxel(located[j])
            draw.line([x - 4, y - 4, x + 4, y + 4], fill=colours[j], width=2)
            draw.line([x - 4, y + 4, x + 4, y - 4], fill=colours[j], width=2)
    img.save(path, optimize=True)


def oof_cases(run_dir: Path, truth: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Case id -> the run's out-of-fold points of that case (oof_points.csv rows).

    Studies are matched to cases through the ``cases.csv`` (study_id, case_id) of the run's data
    folders (those written by ``spinegrade import``).
    """
    from spinegrade.data.sources import CASES_FILE, configured_sources

    path = run_dir / "oof_points.csv"
    if not path.is_file():
        raise SystemExit(f"{path} not found: a run trained by this version writes it")
    points = pd.read_csv(path)
    case_of: dict[int, str] = {}
    for src in configured_sources(load_run_config(run_dir)):
        cases = src.data_dir / CASES_FILE
        if cases.is_file():
            c = pd.read_csv(cases, dtype={"case_id": str})
            case_of.update(zip(c["study_id"].astype(int), c["case_id"], strict=True))
    points["case"] = points["study_id"].map(case_of)
    known = points[points["case"].isin(set(truth["case_id"].astype(str)))]
    return {str(case): g for case, g in known.groupby("case", sort=False)}


def held_out_folds(run_dir: Path, folds: list[int]) -> dict[str, int]:
    """Case id -> the fold (of ``folds``) that held it out: the run's folds.csv, its studies
    matched to cases through the ``cases.csv`` of the run's data folders."""
    from spinegrade.data.sources import CASES_FILE, configured_sources

    table = pd.read_csv(run_dir / "folds.csv")
    fold_of = dict(zip(table["study_id"].astype(int), table["fold"].astype(int), strict=True))
    out = {}
    for src in configured_sources(load_run_config(run_dir)):
        cases = src.data_dir / CASES_FILE
        if cases.is_file():
            c = pd.read_csv(cases, dtype={"case_id": str})
            for sid, case in zip(c["study_id"].astype(int), c["case_id"], strict=True):
                if fold_of.get(sid) in folds:
                    out[str(case)] = fold_of[sid]
    if not out:
        raise SystemExit(f"{run_dir} did not train on these real cases: --held-out needs a run "
                         "that did (train PHANTOM SPIDER ...)")  # fmt: skip
    return out


def case_values_of(paths: dict, heights: dict, case) -> dict[str, float]:
    return {"path_mm": paths[str(case)], "height_mm": heights[str(case)]}


def canal_truth(real_dir: Path) -> dict[str, np.ndarray]:
    """Case -> true canal points (5, 3), head first, from REAL_DIR/canal.csv (if it exists).

    They give each disc its own mid-plane (``evaluation.anatomy.disc_axes``); without them the
    planes lie across the spine axis, which at L5/S1 misjudges even the true canal points.
    """
    path = real_dir / "canal.csv"
    if not path.is_file():
        return {}
    canal = pd.read_csv(path, dtype={"case_id": str})
    out = {}
    for case, g in canal.groupby("case_id", sort=False):
        g = g.assign(lv=g["level"].map(TITLE_TO_LEVEL)).set_index("lv").reindex(list(LEVELS))
        out[str(case)] = g[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
    return out


def score_oof(args: argparse.Namespace, truth: pd.DataFrame) -> None:
    """``--oof``: the run's own out-of-fold canal and disc points against the real truth."""
    true_canal = {} if args.spine_axis else canal_truth(args.real_dir)
    cases = oof_cases(args.run_dir, truth)
    if not cases:
        raise SystemExit(
            f"no out-of-fold study of {args.run_dir} is a case of {args.real_dir}: train on the "
            "imported set (`spinegrade import spider`) beside the phantom"
        )
    cfg = load_run_config(args.run_dir)
    params = CacheParams.from_config(cfg.data)
    out_dir = args.out or args.run_dir / "real_bench_oof"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, disc_err, drawn = [], [], []
    for case, g in truth.groupby("case_id", sort=False):
        pts = cases.get(str(case))
        g = g.assign(lv=g["level"].map(TITLE_TO_LEVEL)).set_index("lv").reindex(list(LEVELS))
        if pts is None or g["x_mm"].isna().any():
            continue
        centres = g[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
        planes = true_canal.get(str(case))  # each disc's own mid-plane, where known

        def located(target: str, pts=pts) -> np.ndarray:
            t = pts[pts["target"] == target].set_index("level").reindex(list(LEVELS))
            return t[["x_mm", "y_mm", "z_mm"]].to_numpy(float)

        canal, disc = located("canal"), located("disc_centre")
        disc_err += np.linalg.norm(disc - centres, axis=1).tolist()
        fold = int(pts["fold"].iloc[0]) if "fold" in pts else -1
        scored = score_case(canal, centres, planes)
        case_rows = [{"case": case, "fold": fold, **r} for r in scored]
        rows += case_rows
        wrong = any(r["nearest"] != r["level"] for r in case_rows)
        if (wrong and args.pictures == "misnamed") or args.pictures == "all":
            read = read_series(args.real_dir / "series" / str(case))
            stack = cache_series(read.stacks, params, 0, 0, SAG_T2)[0]
            draw_case(out_dir / f"{case}.png", stack, centres, canal)
            drawn.append(out_dir / f"{case}.png")
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    print(f"run {args.run_dir}: out-of-fold points of {df['case'].nunique()} real cases "
          f"from {args.real_dir}")  # fmt: skip
    plane = "each disc's own plane" if true_canal else "planes across the spine axis"
    print(f"distance of the located canal point to its disc's mid-plane (mm; {plane})")
    print(summarise(df).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    err = np.asarray(disc_err)
    err = err[np.isfinite(err)]
    if len(err):
        print(f"disc centres: {len(err)} located, 3D distance to the true centre median "
              f"{np.median(err):.1f} mm, p90 {np.quantile(err, 0.9):.1f} mm, within 5 mm "
              f"{np.mean(err <= 5):.0%}")  # fmt: skip
    bad = df[misnamed(df)]
    if len(bad):
        names = (f"{r.case} {r.level}->{r.nearest}" for r in bad.itertuples())
        print("misnamed:", ", ".join(names))
    print(f"pictures (cases with a misnamed level{'; all' if args.pictures == 'all' else ''}): "
          f"{out_dir}")  # fmt: skip
    if drawn:
        print(f"montage: {montage(drawn, out_dir / 'montage.png')}")


def montage(paths: list[Path], out: Path, per_row: int = 6) -> Path:
    """The case pictures side by side, each captioned with its case id (one PNG)."""
    from PIL import Image, ImageDraw

    tiles = [Image.open(p).convert("RGB") for p in paths]
    w, h = max(t.width for t in tiles), max(t.height for t in tiles) + 14
    rows = -(-len(tiles) // per_row)
    sheet = Image.new("RGB", (w * min(per_row, len(tiles)), h * rows))
    draw = ImageDraw.Draw(sheet)
    for i, (tile, path) in enumerate(zip(tiles, paths, strict=True)):
        x, y = (i % per_row) * w, (i // per_row) * h
        sheet.paste(tile, (x, y + 14))
        draw.text((x + 2, y + 1), path.stem, fill=(255, 255, 255))
    sheet.save(out, optimize=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("real_dir", type=Path, nargs="?", default=DEFAULT_REAL)
    ap.add_argument("--folds", type=int, nargs="*", default=None, help="default: every fold")
    ap.add_argument("--out", type=Path, default=None, help="pictures (default RUN_DIR/real_bench)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the per-level rows here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decoder", choices=DECODERS, default=None, help="default: the run's")
    ap.add_argument(
        "--zoom", type=float, default=None, help="second look's field share (default: the run's)"
    )
    ap.add_argument(
        "--vote-mm", type=float, default=None,
        help="the whole look's vote on the zoomed look's discs (default: the run's)",
    )  # fmt: skip
    ap.add_argument(
        "--held-out", action="store_true",
        help="each fold on the real cases it did not train on (see above)",
    )  # fmt: skip
    ap.add_argument(
        "--crop",
        choices=("top", "bottom", "both"),
        default=None,
        help="cut each real field --margin mm beyond the end discs (see above)",
    )
    ap.add_argument("--margin", type=float, default=35.0)
    ap.add_argument(
        "--also-as-t1", action="store_true",
        help="give each T2 series also as the study's sagittal T1 (see above)",
    )  # fmt: skip
    ap.add_argument(
        "--fuse-lead", choices=("run", "median", "canal"), default="run",
        help="canal/foramina fusion: the run's lead, the median of three, or the canal's",
    )  # fmt: skip
    ap.add_argument(
        "--oof", action="store_true", help="score the run's own out-of-fold points (see above)"
    )
    ap.add_argument(
        "--spine-axis", action="store_true",
        help="mid-planes across the spine axis even where canal.csv gives each disc's own",
    )  # fmt: skip
    ap.add_argument(
        "--pictures",
        choices=("misnamed", "all", "none"),
        default="misnamed",
        help="--oof: which cases get a picture",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    truth_path = args.real_dir / "truth.csv"
    if not truth_path.is_file():
        raise SystemExit(f"{truth_path} not found: give REAL_DIR (series/ + truth.csv)")
    truth = pd.read_csv(truth_path, dtype={"case_id": str})
    true_canal = {} if args.spine_axis else canal_truth(args.real_dir)
    if args.oof:
        score_oof(args, truth)
        return
    cfg = load_run_config(args.run_dir)
    folds = run_folds(args.run_dir, args.folds)
    localizers = [load_fold_models(fold_dir(args.run_dir, k)).localizer for k in folds]
    for loc in localizers:
        loc.decoder = args.decoder or loc.decoder
        loc.zoom = loc.zoom if args.zoom is None else args.zoom
        loc.vote_mm = loc.vote_mm if args.vote_mm is None else args.vote_mm
        if args.fuse_lead != "run":
            loc.fuse_lead = "" if args.fuse_lead == "median" else args.fuse_lead
    held_out = held_out_folds(args.run_dir, folds) if args.held_out else None
    params = CacheParams.from_config(cfg.data)  # as predict caches for this run
    out_dir = args.out or args.run_dir / "real_bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    paths: dict[str, float] = {}
    heights: dict[str, float] = {}
    for case, g in truth.groupby("case_id", sort=False):
        g = g.assign(lv=g["level"].map(TITLE_TO_LEVEL)).set_index("lv").reindex(list(LEVELS))
        if g["x_mm"].isna().any():
            print(f"{case}: skipped, truth does not name all five levels")
            continue
        centres = g[["x_mm", "y_mm", "z_mm"]].to_numpy(float)
        planes = true_canal.get(str(case))  # each disc's own mid-plane, where known
        paths[str(case)] = float(np.linalg.norm(np.diff(centres, axis=0), axis=1).sum())
        read = read_series(args.real_dir / "series" / str(case))
        if not read.stacks:
            print(f"{case}: skipped, no readable stack in {args.real_dir / 'series' / str(case)}")
            continue
        stack = cache_series(read.stacks, params, 0, 0, SAG_T2)[0]
        if args.crop:
            stack = crop_field(stack, centres, args.margin, args.crop)
        heights[str(case)] = field_height(stack, centres)
        series = {SAG_T2: [stack], **({SAG_T1: [stack]} if args.also_as_t1 else {})}
        if held_out is not None:  # only the fold that never saw this case
            k = held_out.get(str(case))
            if k is None:
                continue
            p = localize_study(localizers[folds.index(k)], series)
            looks = [(k, p.xyz[0])]
            for r in score_case(looks[0][1], centres, planes):
                rows.append({"case": case, "fold": k, **r, **case_values_of(paths, heights, case)})
            draw_case(out_dir / f"{case}.png", stack, centres, looks[-1][1])
            continue
        points = [localize_study(loc, series) for loc in localizers]
        # Each fold's own points (what its OOF grading saw), and with several folds the
        # consensus that prediction grades at (localize.localize_consensus).
        looks = [(k, p.xyz[0]) for k, p in zip(folds, points, strict=True)]
        if len(folds) > 1:
            looks.append(("consensus", localize_consensus(localizers, series).xyz[0]))
        case_values = case_values_of(paths, heights, case)
        for k, located in looks:
            for r in score_case(located, centres, planes):
                rows.append({"case": case, "fold": k, **r, **case_values})
        draw_case(out_dir / f"{case}.png", stack, centres, looks[-1][1])
    df = pd.DataFrame(rows)
    if args.csv:
        df.to_csv(args.csv, index=False)
    print(
        f"run {args.run_dir} folds {folds} (decoder {localizers[0].decoder}); "
        f"{df['case'].nunique()} real cases from {args.real_dir}"
        + (
            f"; fields cut {args.margin:g} mm beyond the end discs ({args.crop})"
            if args.crop
            else ""
        )
    )
    plane = "each disc's own plane" if true_canal else "planes across the spine axis"
    print(f"distance of the located canal point to its disc's mid-plane (mm; {plane})")
    fold_rows = df[df["fold"] != "consensus"]
    if held_out is not None:
        print(f"each fold on its held-out real cases (vote_mm {localizers[0].vote_mm:g}):")
    elif len(folds) > 1:
        print(f"each fold's points, pooled over folds {folds}:")
    print(summarise(fold_rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    shown = fold_rows
    if len(folds) > 1 and held_out is None:
        shown = df[df["fold"] == "consensus"]
        print("the folds' consensus (what prediction grades at):")
        print(summarise(shown).to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print("by the spine's size (quartiles of the L1/L2 -> L5/S1 path through the disc centres):")
    table = by_quartile(shown, paths, "path_mm")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    print(
        "by where the spine sits in the field (quartiles of the height, mm, of the middle of"
        " L1/L2..L5/S1 above the field's middle):"
    )
    table = by_quartile(shown, heights, "height_mm")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    bad = shown[misnamed(shown)]
    if len(bad):
        names = (f"{r.case} {r.level}->{r.nearest}" for r in bad.itertuples())
        print("misnamed:", ", ".join(names))
    print(f"pictures ({'consensus' if len(folds) > 1 else f'fold {folds[0]}'}): {out_dir}")


if __name__ == "__main__":
    main()
