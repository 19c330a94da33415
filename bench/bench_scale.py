"""The `default` recipe's data path at RSNA scale, on the real-size phantom; prints markdown.

    .venv/bin/python bench/bench_scale.py                              # 100, 200 and 400 studies
    .venv/bin/python bench/bench_scale.py --sizes 25 50 100 --synth-workers 2   # a small machine

Synthesises ``max(--sizes)`` studies with ``spinegrade synth --profile rsna`` (real series sizes,
reused when ``--work`` already holds them), empties ``--work``'s cache (cold: ``--keep-cache``
keeps it, and then studies already cached are not timed), then for each size, in increasing
order:

- preprocess: the studies not cached yet, inline (one process), at the `default` config's grid
  (``data.cache_size``/``data.cache_mm``); CPU seconds a study over the studies preprocessed in
  this run (a cached study costs nothing and is never counted), and cache bytes a study;
- train: one fold of ``--config`` (default ``quick``: tiny backbone, CPU) for one epoch of each
  model, as a `spinegrade train` subprocess on a data folder holding only those studies, with a
  sampler summing the private memory of its process tree (see :func:`private_bytes`: memory-
  mapped cache pages are page cache, shared, and not counted).

On CPU the trainer uses no DataLoader workers, so their cost is probed apart at the largest
size: the `default` recipe's grader batches (``--cache-config``: 128 px crops, batch 32) drawn
through a torch DataLoader with 0 and with ``--loader-workers`` workers, from the same studies.
Then prints the growth of the peak private memory with the number of studies and the projection
for the RSNA training set (1,975 studies), each line marked "projected" (not run): preprocessing
on 16 cores (only from studies preprocessed in this run: with none, it is not projected), cache
size, and the peak private memory with the workers (a line through the measured peaks plus the
workers' cost). Figures only: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

RSNA_STUDIES = 1975
RSNA_BYTES = 35e9  # DICOM bytes of the RSNA 2024 training set
TARGET_CORES = 16
TRAIN = [  # one fold, one epoch of every model; the grid is the `default` recipe's
    "train.epochs=1", "localizer.epochs=1", "train.eval_every=1", "train.folds=[0]",
]  # fmt: skip


def private_bytes(pid: int, root: bool = True) -> int:
    """Private memory of one process that the page cache cannot share (smaps_rollup, bytes).

    The root process: ``Anonymous`` (its heap, tensors, arrays; never file pages). A forked
    child shares its parent's anonymous pages copy-on-write: only what it wrote itself is its
    own (``Private_Dirty``; read-only mapped cache files are clean and not counted).
    """
    key = "Anonymous:" if root else "Private_Dirty:"
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreePrivate:
    """Samples the summed private memory of a process and its descendants; keeps the peak."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        import psutil

        self.proc, self.period, self.peak, self.peak_procs = psutil.Process(pid), period, 0, 0
        self.samples: list[tuple[float, int]] = []  # (unix time, bytes): when the peak happens
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                pids = [self.proc.pid] + [p.pid for p in self.proc.children(recursive=True)]
            except psutil.Error:
                break
            total = sum(private_bytes(p, p == pids[0]) for p in pids)
            self.samples.append((time.time(), total))
            if total > self.peak:
                self.peak, self.peak_procs = total, len(pids)
            time.sleep(self.period)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def synthesise(data: Path, n: int, workers: int) -> float:
    """The rsna-profile phantom with ``n`` training studies (kept if already there); seconds."""
    meta = data / "truth" / "phantom.json"
    if meta.is_file() and json.loads(meta.read_text())["n_train"] >= n:
        return 0.0
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "spinegrade.cli", "synth", str(data), "--studies", str(n),
           "--test-studies", "0", "--profile", "rsna", "--workers", str(workers),
           "--overwrite"]  # fmt: skip
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def subset(data: Path, out: Path, ids: list[int]) -> Path:
    """A data folder with only ``ids`` in its tables (images linked, not copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("train.csv", "train_series_descriptions.csv", "train_label_coordinates.csv"):
        df = pd.read_csv(data / name)
        df[df["study_id"].isin(ids)].to_csv(out / name, index=False)
    link = out / "train_images"
    if not link.exists():
        link.symlink_to((data / "train_images").resolve())
    return out


def preprocess(data: Path, cache: Path, n: int, cfg) -> dict:
    """Cache the first ``n`` studies (inline); CPU seconds of the studies newly cached (``new``;
    None a study when there were none: nothing was measured), bytes a study."""
    from spinegrade.preprocessing.build import preprocess_dataset
    from spinegrade.preprocessing.cache import read_index

    c0, t0 = time.process_time(), time.perf_counter()
    s = preprocess_dataset(data, cache, limit=n, size=cfg.data.cache_size, mm=cfg.data.cache_mm,
                           progress=False)  # fmt: skip
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    index = read_index(cache)
    ids = sorted(index["study_id"].unique())[:n]
    ok = index[index["study_id"].isin(ids) & (index["status"] == "ok")]
    nbytes = sum((cache / p).stat().st_size + (cache / p).with_suffix(".npy").stat().st_size
                 for p in ok["path"])  # fmt: skip
    return {
        "ids": [int(i) for i in ids],
        "new": s.n_processed,
        "cpu_s": cpu,
        "cpu_s_per_study": cpu / s.n_processed if s.n_processed else None,
        "wall_s_per_study": wall / s.n_processed if s.n_processed else None,
        "slices_per_study": float(ok["n_slices"].sum() / n),
        "bytes_per_study": nbytes / n,
        "px_per_slice": float(
            (ok["height"] * ok["width"] * ok["n_slices"]).sum() / ok["n_slices"].sum()
        ),
    }


def train(data: Path, cache: Path, run: Path, config: str, extra: list[str]) -> dict:
    """One fold, one epoch a model, in a subprocess; peak private memory and stage seconds."""
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "spinegrade.cli", "train", str(data), "--cache", str(cache),
           "--out", str(run), "--config", config, "--no-progress", *TRAIN, *extra]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = TreePrivate(proc.pid)
    _, err = proc.communicate()
    peak = sampler.stop()
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"train failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    # Beside the fold's log.jsonl: which stage the memory peaks in.
    pd.DataFrame(sampler.samples, columns=["time", "private_bytes"]).to_csv(
        run / "memory.csv", index=False
    )
    timing = json.loads((run / "fold_0" / "metrics.json").read_text())["timing"]
    epoch = timing["localizer_s"] + sum(v for k, v in timing.items() if k.startswith("grader_"))
    return {"peak_private": peak, "procs": sampler.peak_procs, "epoch_s": epoch, "wall_s": wall}


def loader_probe(data: Path, cache: Path, config: str, workers: int) -> None:
    """Run in a subprocess: one pass of grader batches through a DataLoader with ``workers``."""
    import torch

    from spinegrade.config import load_config
    from spinegrade.data.grader_dataset import GraderDataset, collate_levels
    from spinegrade.data.studies import load_studies
    from spinegrade.rsna import load_dataset, normalize_coordinates

    cfg = load_config(config)
    ds = load_dataset(data)
    coords = normalize_coordinates(ds.coordinates)
    studies = load_studies(cache, ds.labels["study_id"].tolist(), ds.labels, coords, progress=False)
    items = GraderDataset(
        list(studies.values()), {s: d.points for s, d in studies.items()}, "spinal", cfg.crops, True
    )
    loader = torch.utils.data.DataLoader(
        items, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
        collate_fn=collate_levels, persistent_workers=False,
    )  # fmt: skip
    for _ in range(2):  # two epochs: the workers' steady state
        for _batch in loader:
            pass


def probe(data: Path, cache: Path, config: str, workers: int) -> int:
    """Peak private memory of :func:`loader_probe` with ``workers`` DataLoader workers."""
    cmd = [sys.executable, __file__, "--probe", str(data), str(cache), config, str(workers)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})
    sampler = TreePrivate(proc.pid, period=0.05)
    proc.wait()
    peak = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"loader probe failed ({proc.returncode})")
    return peak


def preprocess_rate(rows: list[dict]) -> tuple[float, int] | None:
    """CPU seconds a study over the studies preprocessed in this run, and their number; None
    when every study was cached already (a warm cache: nothing measured, nothing to project)."""
    new = sum(r["new"] for r in rows)
    return (sum(r["cpu_s"] for r in rows) / new, new) if new else None


def projection_lines(
    rows: list[dict], at_rsna: float, workers_cost: float, loader_workers: int
) -> list[str]:
    """The RSNA-scale lines, each saying "projected"; preprocessing only from measured studies."""
    gb = 1e9
    lines = [f"Projected for the RSNA training set ({RSNA_STUDIES} studies; not run):", ""]
    rate = preprocess_rate(rows)
    if rate is None:
        lines.append("- preprocess: not projected: every study was cached before this run "
                     "(--keep-cache, warm), so no preprocessing was measured")  # fmt: skip
    else:
        cpu_s, new = rate
        minutes = RSNA_STUDIES * cpu_s / TARGET_CORES / 60
        lines.append(f"- preprocess, projected: {cpu_s:.2f} CPU s a study (measured on {new} "
                     f"studies preprocessed here) -> {minutes:.1f} min on {TARGET_CORES} cores, "
                     f"plus reading {RSNA_BYTES / gb:.0f} GB from disk")  # fmt: skip
    per_study = float(np.mean([r["bytes_per_study"] for r in rows]))
    lines.append(f"- cache, projected: {per_study / 1e6:.1f} MB a study -> "
                 f"{RSNA_STUDIES * per_study / gb:.1f} GB")  # fmt: skip
    total = (at_rsna + workers_cost) / gb
    lines.append(f"- training peak private memory with {loader_workers} DataLoader workers, "
                 f"projected: {total:.2f} GB ({at_rsna / gb:.2f} GB: the line through the "
                 f"measured peaks, at least the highest; + {workers_cost / gb:.2f} GB of "
                 "workers)")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--work", type=Path, default=Path("/tmp/spinegrade_scale"))
    ap.add_argument("--config", default="quick", help="training config (tiny backbone on CPU)")
    ap.add_argument("--cache-config", default="default", help="config whose cache grid is used")
    ap.add_argument("--synth-workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--keep-cache", action="store_true",
                    help="reuse --work's cache (warm): cached studies are not timed")  # fmt: skip
    ap.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)  # internal: see loader_probe
    args = ap.parse_args()
    if args.probe:
        data, cache, config, workers = args.probe
        return loader_probe(Path(data), Path(cache), config, int(workers))

    from spinegrade.config import load_config

    sizes = sorted(args.sizes)
    cache_cfg = load_config(args.cache_config)
    grid = [f"data.cache_size={cache_cfg.data.cache_size}",
            f"data.cache_mm={cache_cfg.data.cache_mm}"]  # fmt: skip
    data, cache = args.work / "data", args.work / "cache"
    synth_s = synthesise(data, sizes[-1], args.synth_workers)
    if not args.keep_cache:  # cold: every study is preprocessed, and timed, in this run
        shutil.rmtree(cache, ignore_errors=True)
    dicom = sum(f.stat().st_size for f in (data / "train_images").rglob("*.dcm"))
    n_all = len(pd.read_csv(data / "train.csv"))
    rows = []
    for n in sizes:
        pre = preprocess(data, cache, n, cache_cfg)
        sub = subset(data, args.work / f"data_{n}", pre["ids"])
        tr = train(sub, cache, args.work / f"run_{n}", args.config, grid)
        rows.append({"n": n, **pre, **tr})
        print(f"  {n} studies: {json.dumps({k: v for k, v in rows[-1].items() if k != 'ids'})}",
              file=sys.stderr)  # fmt: skip
    big = rows[-1]
    sub = args.work / f"data_{big['n']}"
    loader0 = probe(sub, cache, args.cache_config, 0)
    loader_w = probe(sub, cache, args.cache_config, args.loader_workers)
    workers_cost = max(0.0, loader_w - loader0)

    ns = np.array([r["n"] for r in rows], float)
    peaks = np.array([r["peak_private"] for r in rows], float)
    slope, icpt = np.polyfit(ns, peaks, 1) if len(ns) > 1 else (0.0, peaks[0])
    # A flat series gives a line of any small slope (even negative): never project below the
    # highest peak measured.
    at_rsna = max(icpt + slope * RSNA_STUDIES, float(peaks.max()))

    print(f"### Scale ({', '.join(str(n) for n in sizes)} rsna-profile phantom studies)\n")
    synth = f"; synthesised in {synth_s:.0f} s" if synth_s else ""
    print(f"Phantom: {n_all} studies, {dicom / n_all / 1e6:.1f} MB of DICOM a study (real set: "
          f"{RSNA_BYTES / RSNA_STUDIES / 1e6:.1f} MB){synth}."
          f" Cache grid: `{args.cache_config}` ({' '.join(grid)}), "
          f"{'kept from before (warm)' if args.keep_cache else 'emptied first (cold)'}; "
          f"training: `{args.config}`, "
          "one fold, one epoch each (localiser + 3 graders), DataLoader workers 0.\n")  # fmt: skip
    print(
        "| studies | preprocess CPU s/study (studies timed) | slices/study | cached px/slice "
        "| cache MB/study "
        "| peak private MB (procs) | train s/epoch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = "— (all cached)" if r["new"] == 0 else f"{r['cpu_s_per_study']:.2f} ({r['new']})"
        print(f"| {r['n']} | {cpu} | {r['slices_per_study']:.0f} | "
              f"{np.sqrt(r['px_per_slice']):.0f}² | {r['bytes_per_study'] / 1e6:.1f} | "
              f"{r['peak_private'] / 1e6:.0f} ({r['procs']}) | {r['epoch_s']:.0f} |")  # fmt: skip
    growth = peaks[-1] / peaks[0] - 1
    print(f"\n- peak private memory {sizes[0]} -> {sizes[-1]} studies: {100 * growth:+.1f}% "
          f"(fitted line: {slope * 1e3 / 1e6:.2f} MB per 1,000 studies)")  # fmt: skip
    print(
        f"- DataLoader probe at {big['n']} studies (`{args.cache_config}` grader batches): "
        f"{loader0 / 1e6:.0f} MB with 0 workers, {loader_w / 1e6:.0f} MB with "
        f"{args.loader_workers}: {workers_cost / 1e6:.0f} MB for the workers"
    )
    print()
    print("\n".join(projection_lines(rows, at_rsna, workers_cost, args.loader_workers)))


if __name__ == "__main__":
    main()
