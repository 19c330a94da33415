"""Fold models -> graded studies, and ``spinegrade predict``.

- :mod:`.run_folder`: the run folder's layout, its one config, ``folds.csv``, where each fold lives
  (the contract between training, which writes it, and prediction, which reads only it);
- :mod:`.fold_models`: one fold's localiser and graders rebuilt from its folder, grading studies
  (shared by out-of-fold evaluation and prediction);
- :mod:`.ensemble`: the fold ensemble (:class:`~.ensemble.Predictor`), which folds and where;
- :mod:`.inputs`: what predict reads (an RSNA test layout, or raw DICOM folders behind symlinks);
- :mod:`.predict`: the driver: inputs -> cache -> ensemble -> ``submission.csv`` and reports.

May import every floor below it (the ground floor, io, rsna, evaluation, reporting,
preprocessing, models, localization, data); training imports it, never the reverse.
"""
