"""Label vocabularies shared by the datasets, the synthetic corpus and the evaluation."""

from __future__ import annotations

from typing import Final

#: The 14 CheXpert observations, in the column order of CheXpert's ``train.csv``.
CHEXPERT_LABELS: Final[tuple[str, ...]] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

#: The eight categories of the CheXpert 8x200 retrieval protocol (ConVIRT, appendix).
CHEXPERT_8X200_CATEGORIES: Final[tuple[str, ...]] = (
    "Atelectasis",
    "Cardiomegaly",
    "Edema",
    "Fracture",
    "No Finding",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

#: CheXpert's label values: 1 positive, 0 negative, -1 uncertain; a missing value is None.
POSITIVE: Final = 1.0
NEGATIVE: Final = 0.0
UNCERTAIN: Final = -1.0
