"""Probabilities for clinicians: the training's class-weight lean removed.

The graders minimise cross-entropy with class weights w = (1, 2, 4) (the competition's metric).
The minimiser of a weighted cross-entropy is q_k proportional to w_k * p_k, where p is the true
posterior, so the model's outputs lean towards Moderate and Severe. Dividing by the weights and
renormalising, p_k = (q_k / w_k) / sum_j (q_j / w_j), undoes exactly that lean. submission.csv keeps
q (metric-optimal); the SR and the worklist show p, and say so.
"""

from __future__ import annotations

import numpy as np

from spinegrade.task import CLASS_WEIGHTS, Task

DEWEIGHT_NOTE = (
    "Probabilities shown with the training class weights (Normal/Mild 1, Moderate 2, Severe 4) "
    "removed: p / weight, renormalised. submission.csv keeps the metric-optimal values."
)


def deweight(probs: np.ndarray, weights: tuple[float, ...] = CLASS_WEIGHTS) -> np.ndarray:
    """``(..., 3)`` weighted-loss probabilities -> posterior estimates (rows sum to 1)."""
    q = np.asarray(probs, dtype=np.float64) / np.asarray(weights, dtype=np.float64)
    return q / q.sum(axis=-1, keepdims=True)


def deweight_note(task: Task) -> str:
    """What the shown probabilities are, for ``task``'s class weights."""
    if task.is_rsna:
        return DEWEIGHT_NOTE
    if all(len(set(c.class_weights)) == 1 for c in task.conditions):
        return (
            f"Probabilities as the model gives them: task {task.name!r} weights every grade "
            "equally in training, so there is no lean to remove."
        )
    return (
        f"Probabilities shown with task {task.name!r}'s training class weights removed: "
        "p / weight, renormalised. The prediction table keeps the model's values."
    )
