"""Per-category text queries for evaluating on any labelled corpus.

Written for this project (not the ConVIRT experts' queries, which ship with the official
protocol files): four short report-style sentences per CheXpert 8x200 category, phrased as
a radiologist would describe the finding on a frontal film. A corpus whose categories are
not all listed here needs a text-query file (``--text-queries``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from model.evaluation.errors import ProtocolError
from model.evaluation.protocol import TextQuery

DEFAULT_TEXT_QUERIES: Final[dict[str, tuple[str, ...]]] = {
    "Atelectasis": (
        "Linear opacity at the lung base consistent with subsegmental atelectasis.",
        "Volume loss with plate-like opacity suggests atelectasis.",
        "Bibasilar atelectasis is seen.",
        "Collapse of the lower lobe with elevation of the hemidiaphragm.",
    ),
    "Cardiomegaly": (
        "The cardiac silhouette is enlarged.",
        "Cardiomegaly with a cardiothoracic ratio greater than one half.",
        "The heart is enlarged.",
        "Enlargement of the cardiac shadow is noted.",
    ),
    "Edema": (
        "Diffuse bilateral interstitial opacities consistent with pulmonary edema.",
        "Vascular congestion and perihilar haziness suggest pulmonary edema.",
        "Pulmonary edema is present.",
        "Bilateral hazy airspace opacities in keeping with alveolar edema.",
    ),
    "Fracture": (
        "There is an acute rib fracture.",
        "A displaced fracture of the posterior rib is seen.",
        "Cortical discontinuity of the clavicle consistent with fracture.",
        "A nondisplaced rib fracture is noted.",
    ),
    "No Finding": (
        "The lungs are clear and the heart size is normal.",
        "No acute cardiopulmonary abnormality.",
        "Normal chest radiograph.",
        "No focal consolidation, effusion or pneumothorax.",
    ),
    "Pleural Effusion": (
        "Blunting of the costophrenic angle consistent with a pleural effusion.",
        "A moderate pleural effusion is present.",
        "Fluid layers in the pleural space at the lung base.",
        "Meniscus-shaped opacity at the base in keeping with effusion.",
    ),
    "Pneumonia": (
        "Focal airspace consolidation consistent with pneumonia.",
        "Patchy opacity in the lower lobe suggesting pneumonia.",
        "Lobar consolidation with air bronchograms.",
        "Findings are compatible with pneumonia.",
    ),
    "Pneumothorax": (
        "A pneumothorax is present with a visible pleural line.",
        "Apical lucency without lung markings consistent with pneumothorax.",
        "There is a small pneumothorax.",
        "The visceral pleural line is displaced from the chest wall.",
    ),
}

#: Where built-in queries say they come from in reports and error messages.
BUILT_IN_SOURCE: Final = "built-in query"


def default_text_queries(categories: Sequence[str]) -> list[TextQuery]:
    """The built-in queries of ``categories``, in that order.

    Raises :class:`ProtocolError` (``category_absent``) for a category without built-in
    queries: the corpus then needs a text-query file.
    """
    missing = [name for name in categories if name not in DEFAULT_TEXT_QUERIES]
    if missing:
        raise ProtocolError(
            f"no built-in text queries for {', '.join(missing)}; built-in categories are "
            f"{', '.join(DEFAULT_TEXT_QUERIES)}. Give a text-query file "
            "(CSV with Variable,Text or category,text columns)",
            code="category_absent",
        )
    return [
        TextQuery(category=name, text=text, where=f"{BUILT_IN_SOURCE} {name} #{number}")
        for name in categories
        for number, text in enumerate(DEFAULT_TEXT_QUERIES[name], 1)
    ]
