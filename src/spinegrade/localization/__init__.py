"""Stage 1: where are the disc levels? 3D points per level from the sagittal series.

* Sagittal T2/STIR -> the five disc-level points in the spinal canal (mid-sagittal slice).
* Sagittal T1 -> the ten neural foramina (left and right, L1/L2..L5/S1).
* Axial T2 -> no network: the recesses are derived from the canal point in patient space.

In reading order: :mod:`.points` (a study's points), :mod:`.tasks` (which nets a run trains),
:mod:`.frames` (the canonical sagittal frame), :mod:`.samples` (training targets),
:mod:`.localizer` (a fold's nets, saved and loaded), :mod:`.decode` (probability map -> five
ordered levels), :mod:`.looks` (whole, zoomed and close looks at a stack), :mod:`.derived`
(offsets and fusion), :mod:`.localize` (studies -> points, the folds' consensus) and
:mod:`.errors` (distances to labelled points).

May import the ground floor, :mod:`spinegrade.rsna`, :mod:`spinegrade.preprocessing` and
:mod:`spinegrade.models`.
"""
