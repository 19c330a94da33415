"""Training: the loop, its losses and the two stages, and cross-validation.

- :mod:`.engine`: the fit loop (mixed precision, DDP, checkpoints, resumable);
- :mod:`.batches`, :mod:`.optim`, :mod:`.checkpoints`: its batches per rank, its optimiser and
  schedule, its per-epoch checkpoints and weight average;
- :mod:`.losses`: the metric-shaped losses (1/2/4 weights, the any-severe term);
- :mod:`.stages`: one fold's localiser and graders;
- :mod:`.cv`: the folds, out-of-fold predictions (graded through the inference package),
  ``oof.csv`` and ``cv.json``.

May import every floor below it; only the demo and the CLI import it.
"""
