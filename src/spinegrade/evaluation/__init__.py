"""Scoring out-of-fold predictions.

- :mod:`.metrics`: the RSNA 2024 metric with its four terms, and the constant baselines (uniform,
  class prior, best constant per column);
- :mod:`.anatomy`: whether located levels sit on their own disc (mid-plane distance, misnamed).

May import the ground floor (:mod:`spinegrade.task`, :mod:`spinegrade.util`) and
:mod:`spinegrade.rsna`.
"""
