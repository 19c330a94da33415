"""spinegrade: lumbar spine degeneration grading on MRI (RSNA 2024 format)."""

__version__ = "0.1.0"
