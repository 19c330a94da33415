"""What people read: per-study figures, ``grades.json`` and ``index.html``.

- :mod:`.report`: the study figure (levels on the sagittal images, grades per level) and the index;
- :mod:`.clinical`: probabilities with the 1/2/4 training lean removed, for clinicians;
- :mod:`.codes`: the standard (SNOMED CT, DICOM, LOINC) codes of conditions, levels, sides and
  grades that the DICOM results carry, and the few private ones.

May import the ground floor, :mod:`spinegrade.io` and :mod:`spinegrade.rsna`; it draws what
prediction hands it and imports no stage.
"""
