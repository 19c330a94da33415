"""The preprocessing cache: every series read once, rescaled, resampled, stored with its geometry.

- :mod:`.cache`: the on-disk format (cached stacks with patient-space geometry, the index, the
  manifest) and the projections between patient space and cached voxels;
- :mod:`.series`: one read stack -> a cached volume (intensity window, in-plane grid, uint8);
- :mod:`.study`: one study -> its cached stacks and its record, written last;
- :mod:`.build`: the whole dataset, in parallel and resumable, with its summary;
- :mod:`.guard`: train and predict refuse a cache made with other settings.

May import the ground floor, :mod:`spinegrade.io` (the only DICOM reader) and
:mod:`spinegrade.rsna`.
"""
