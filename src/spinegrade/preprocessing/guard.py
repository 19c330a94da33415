"""The cache guard: train and predict refuse a cache made with other settings."""

from __future__ import annotations

from pathlib import Path

from spinegrade.preprocessing.cache import MANIFEST_NAME, check_cache_settings
from spinegrade.preprocessing.series import CacheParams


def check_cache(cache_dir: str | Path, data_cfg, data_dir: str | Path = "DATA_DIR") -> None:
    """Raise ValueError unless ``cache_dir`` was made with the run config's ``data`` settings.

    The error names the differing settings and the exact `spinegrade preprocess` to rerun.
    """
    params = CacheParams.from_config(data_cfg)
    fix = (
        f"rerun `spinegrade preprocess {data_dir} --cache {cache_dir} --set data.cache_size="
        f"{params.size} --set data.cache_mm={params.mm}` (or train with a config matching the "
        "cache)"
    )
    check_cache_settings(cache_dir, params.settings(), fix)


def refuse_other_cache(cache_dir: Path, data_cfg, run_dir: str | Path) -> None:
    """Prediction: refuse an existing cache folder made with settings other than the run's
    (it is the user's, maybe a training cache: never rebuilt in place)."""
    if not (Path(cache_dir) / MANIFEST_NAME).is_file():
        return  # a new (or unfinished) work folder: preprocessing writes it with the run's settings
    fix = (
        f"the run {run_dir} needs data.cache_size={data_cfg.cache_size} data.cache_mm="
        f"{data_cfg.cache_mm}; give `spinegrade predict` another --cache work folder (or delete "
        f"{cache_dir}), it is not rebuilt in place"
    )
    check_cache_settings(cache_dir, CacheParams.from_config(data_cfg).settings(), fix)
