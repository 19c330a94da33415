"""The real data contract: the RSNA 2024 CSV tables and the cross-validation folds.

- :mod:`.tables`: strict loading and validation of the CSVs, wide <-> long label tables, label
  matrices, the metric's solution rows, coordinates in package vocabulary;
- :mod:`.folds`: study-grouped, severity-stratified folds, saved as ``folds.csv`` and reused;
- :mod:`.spider`: ``spinegrade import spider``, the SPIDER T2-SPACE set as an RSNA-layout
  training folder (imported on demand: it reads DICOM headers with pydicom).
"""

from spinegrade.rsna.folds import (
    FOLD_COLUMNS,
    fold_strata,
    fold_summary,
    load_folds,
    make_folds,
    save_folds,
    severity_profile,
)
from spinegrade.rsna.tables import (
    COORDINATE_COLUMNS,
    DISC_COORDINATE_COLUMNS,
    LONG_COLUMNS,
    MISSING_LABEL,
    SERIES_COLUMNS,
    TRAIN_COLUMNS,
    RSNADataset,
    RSNAFormatError,
    coordinates_to_titles,
    is_phantom,
    join_labels_coordinates,
    label_matrix,
    load_coordinates,
    load_dataset,
    load_disc_coordinates,
    load_series_descriptions,
    load_train,
    long_to_wide,
    matrix_to_wide,
    normalize_coordinates,
    solution_table,
    wide_to_long,
)

__all__ = [
    "COORDINATE_COLUMNS",
    "DISC_COORDINATE_COLUMNS",
    "FOLD_COLUMNS",
    "LONG_COLUMNS",
    "MISSING_LABEL",
    "SERIES_COLUMNS",
    "TRAIN_COLUMNS",
    "RSNADataset",
    "RSNAFormatError",
    "coordinates_to_titles",
    "fold_strata",
    "fold_summary",
    "is_phantom",
    "join_labels_coordinates",
    "label_matrix",
    "load_coordinates",
    "load_dataset",
    "load_disc_coordinates",
    "load_folds",
    "load_series_descriptions",
    "load_train",
    "long_to_wide",
    "make_folds",
    "matrix_to_wide",
    "normalize_coordinates",
    "save_folds",
    "severity_profile",
    "solution_table",
    "wide_to_long",
]
