"""The built-in lumbar spine phantom: synthetic MRI studies in the RSNA 2024 layout, known truth.

Nothing on the training or prediction path imports this package; the demo, ``spinegrade synth``,
``spinegrade evaluate --truth`` and the tests do. One module per job:

- :mod:`.labels`: a latent severity per cell with the real label statistics, and a reader model
  (ordinal probit) that turns it into labels, so P(class | latent) is known exactly;
- :mod:`.anatomy`: a 3D lumbar spine per study whose canal, recesses and foramina narrow with the
  latent severity; :mod:`.ops`, :mod:`.soft` and :mod:`.scene`: its tissue maps;
- :mod:`.render`: sagittal T1, sagittal T2/STIR and angled axial T2 acquisitions;
- :mod:`.study`: one study (series plan, instance numbers, files, label points);
- :mod:`.writer`: DICOM files and CSVs; :mod:`.preview`: PNG previews;
- :mod:`.generate`: the dataset driver (:func:`generate_dataset`);
- :mod:`.truth`: what the truth scores, the Bayes limit above all.
"""

from spinegrade.phantom.generate import SynthConfig, generate_dataset, load_study_anatomy, study_ids
from spinegrade.phantom.preview import render_preview
from spinegrade.phantom.truth import read_true_probs, truth_scores

__all__ = [
    "SynthConfig",
    "generate_dataset",
    "load_study_anatomy",
    "read_true_probs",
    "render_preview",
    "study_ids",
    "truth_scores",
]
