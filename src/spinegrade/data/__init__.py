"""Datasets and crops for both stages, and their augmentation.

- :mod:`.studies`: studies in memory (series choice, cached stacks, labelled points);
- :mod:`.crops`: per level and side, a short stack of slices around a point;
- :mod:`.grader_dataset`: stage 2's training crops around true points, jittered;
- :mod:`.localizer_dataset`: stage 1's augmented looks at sagittal stacks;
- :mod:`.epoch`: the dataset base whose randomness is a pure function of (seed, epoch, index).

May import the ground floor, :mod:`spinegrade.rsna`, :mod:`spinegrade.preprocessing` and
:mod:`spinegrade.localization` (the frames and points the crops are cut at).
"""
