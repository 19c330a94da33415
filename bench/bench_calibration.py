"""Which probabilities to show a clinician: calibration of a run's out-of-fold predictions as the
graders give them (trained with class weights 1/2/4), de-weighted (p / weight, renormalised) and
recalibrated by a fit on the OOF predictions (temperature + per-class bias, cross-fitted by fold
so no study is scored by a fit that saw it). Prints NLL, Brier and ECE; writes a reliability plot.

    .venv/bin/python bench/bench_calibration.py RUN_DIR DATA_DIR [--plot reliability.png]

De-weighting is the fitted family's special case temperature 1, bias -log(weight): if the fit
cannot beat it by much, the parameter-free rule is the one to ship.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.special import log_softmax

from spinegrade.reporting.clinical import deweight
from spinegrade.rsna.tables import label_matrix, load_train
from spinegrade.task import LABEL_COLUMNS, PROB_COLUMNS, SEVERITIES

BINS = 10


def oof_rows(run: Path, data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(probs (N, 3), labels (N,), fold (N,)) of every labelled OOF target."""
    oof = pd.read_csv(run / "oof.csv").set_index("row_id")
    folds = pd.read_csv(run / "folds.csv").set_index("study_id")["fold"]
    wide = load_train(data / "train.csv")
    labels = label_matrix(wide)
    probs, ys, fs = [], [], []
    for sid, row in zip(wide["study_id"], labels, strict=True):
        if sid not in folds.index:
            continue
        for j, column in enumerate(LABEL_COLUMNS):
            rid = f"{sid}_{column}"
            if row[j] < 0 or rid not in oof.index:
                continue
            probs.append(oof.loc[rid, list(PROB_COLUMNS)].to_numpy(float))
            ys.append(row[j])
            fs.append(folds[sid])
    return np.array(probs), np.array(ys), np.array(fs)


def fit_scaling(logq: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Temperature a and biases b (3) minimising the unweighted NLL of softmax(a log q + b)."""

    def nll(theta: np.ndarray) -> float:
        z = log_softmax(theta[0] * logq + theta[1:], axis=1)
        return -z[np.arange(len(y)), y].mean()

    return minimize(nll, np.array([1.0, 0.0, 0.0, 0.0]), method="L-BFGS-B").x


def cross_fitted(probs: np.ndarray, y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    logq = np.log(np.clip(probs, 1e-7, 1.0))
    out = np.empty_like(probs)
    for k in np.unique(fold):
        theta = fit_scaling(logq[fold != k], y[fold != k])
        out[fold == k] = np.exp(log_softmax(theta[0] * logq[fold == k] + theta[1:], axis=1))
    return out


def ece(probs: np.ndarray, y: np.ndarray) -> float:
    """Class-wise expected calibration error (10 equal-width bins, averaged over the 3 classes)."""
    errs = []
    for c in range(probs.shape[1]):
        p, hit = probs[:, c], (y == c).astype(float)
        idx = np.minimum((p * BINS).astype(int), BINS - 1)
        errs.append(sum(abs(p[idx == b].mean() - hit[idx == b].mean()) * (idx == b).mean()
                        for b in range(BINS) if (idx == b).any()))  # fmt: skip
    return float(np.mean(errs))


def scores(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    onehot = np.eye(3)[y]
    return {
        "nll": float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-15, 1)).mean()),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
        "ece": ece(probs, y),
        "mean_p_severe": float(probs[:, 2].mean()),
    }


def reliability_plot(methods: dict[str, np.ndarray], y: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.3))
    for c, ax in enumerate(axes):
        ax.plot([0, 1], [0, 1], color="#999", lw=1, ls="--")
        for name, probs in methods.items():
            p, hit = probs[:, c], (y == c)
            idx = np.minimum((p * BINS).astype(int), BINS - 1)
            keep = [b for b in range(BINS) if (idx == b).sum() >= 5]
            ax.plot([p[idx == b].mean() for b in keep], [hit[idx == b].mean() for b in keep],
                    marker="o", label=name)  # fmt: skip
        ax.set_title(f"{SEVERITIES[c]} (observed {np.mean(y == c):.0%})")
        ax.set_xlabel("predicted probability")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("observed frequency")
    axes[0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--plot", type=Path, default=Path("reliability.png"))
    args = ap.parse_args()
    probs, y, fold = oof_rows(args.run_dir, args.data_dir)
    methods = {
        "as trained (weighted)": probs,
        "de-weighted p/w": deweight(probs),
        "OOF-fitted scaling": cross_fitted(probs, y, fold),
    }
    print(f"{len(y)} labelled OOF targets, {len(np.unique(fold))} folds; observed "
          + ", ".join(f"{s} {np.mean(y == c):.1%}" for c, s in enumerate(SEVERITIES)))  # fmt: skip
    print(f"{'probabilities':24s} {'NLL':>7s} {'Brier':>7s} {'ECE':>7s} {'mean p(Severe)':>15s}")
    for name, p in methods.items():
        s = scores(p, y)
        print(f"{name:24s} {s['nll']:7.4f} {s['brier']:7.4f} {s['ece']:7.4f} "
              f"{s['mean_p_severe']:15.3f}")  # fmt: skip
    reliability_plot(methods, y, args.plot)
    print(f"reliability plot: {args.plot}")


if __name__ == "__main__":
    main()
