"""Synthetic chest radiographs paired with reports whose right answers are known.

Real radiographs with reports cannot be shipped, yet the demo, the trainer's smoke and
quality tests and the evaluation's end-to-end test need image/report pairs whose labels
are certain. This package draws frontal chest-radiograph-like grayscale images (MONOCHROME2:
air dark, bone and soft tissue bright) of a thorax with lungs, mediastinum, heart,
diaphragm, ribs, clavicles, spine and lung vessel markings, varies the anatomy per patient
and the acquisition per study, renders the eight CheXpert 8x200 categories visibly, and
writes a report from the findings.

Conventions:

- ``side`` is always the *patient's* side. As on any frontal film the patient's right is on
  the viewer's left, so a right effusion darkens nothing and brightens the image's left base.
- Labels (:attr:`SyntheticStudy.labels`) cover the 14 CheXpert observations. An observation
  is 1.0 exactly when the report asserts it, and 0.0 otherwise: a synthetic study is fully
  known, so "absent" and "explicitly negated" are the same truth here and no value is -1 or
  unknown. "No Finding" is 1.0 exactly when no finding is rendered, and then it is the only
  1.0. Besides its own observation a finding may assert a parent the report names: a
  pneumonia described as an opacity sets "Lung Opacity", one described as consolidation sets
  "Consolidation"; an atelectasis or edema sentence that says "opacity" sets "Lung Opacity".
- The report mentions every rendered finding in FINDINGS and in IMPRESSION and never
  negates one; some absent findings are negated ("No pleural effusion or pneumothorax.").

Determinism: everything a study contains comes from the generator handed to
:func:`render_study` (or, in :func:`generate_corpus` and :func:`write_chexpert_tree`, from
seeds derived from the corpus seed and the study's index or path), so the same seed gives
byte-identical images and reports, and the first 100 studies of a 200-study corpus are the
100 studies of a 100-study corpus. Noise, texture and anatomy are drawn from generators that
do not depend on the findings, so rendering one seed with and without a finding changes only
the pixels the finding touches.

The package reads as the generator's pipeline:

- :mod:`~model.data.synthetic.findings`: the table of findings, their sampling and seeds;
- :mod:`~model.data.synthetic.anatomy`: a patient's body and a study's acquisition;
- :mod:`~model.data.synthetic.writing`: the report writer;
- :mod:`~model.data.synthetic.painting`: the painter, with its layers in
  :mod:`~model.data.synthetic.canvas` (raster primitives),
  :mod:`~model.data.synthetic.thorax` (lungs, airways, vessels),
  :mod:`~model.data.synthetic.skeleton` (bones) and :mod:`~model.data.synthetic.lesions`
  (the findings);
- :mod:`~model.data.synthetic.study`: one study, planned and rendered;
- :mod:`~model.data.synthetic.corpus`: corpora on disk and the CheXpert-style tree.
"""

from model.data.synthetic.anatomy import Anatomy, Geometry, sample_anatomy
from model.data.synthetic.corpus import (
    GENERATOR_VERSION,
    MANIFEST_NAME,
    SPLIT_NAMES,
    chexpert_study,
    generate_corpus,
    write_chexpert_tree,
)
from model.data.synthetic.findings import (
    FINDING_LABELS,
    NO_FINDING,
    SEVERITIES,
    Finding,
    SyntheticDataError,
)
from model.data.synthetic.study import SyntheticStudy, render_study

__all__ = [
    "FINDING_LABELS",
    "GENERATOR_VERSION",
    "MANIFEST_NAME",
    "NO_FINDING",
    "SEVERITIES",
    "SPLIT_NAMES",
    "Anatomy",
    "Finding",
    "Geometry",
    "SyntheticDataError",
    "SyntheticStudy",
    "chexpert_study",
    "generate_corpus",
    "render_study",
    "sample_anatomy",
    "write_chexpert_tree",
]
