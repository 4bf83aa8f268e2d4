"""What the page and ``/ready`` say about the serving model: name, origin, training data.

A user reading results needs to know which model produced them: trained here or imported
(and from where), and on what. Bundles record that in their manifest's provenance; the
demo bundle is marked as trained on synthetic images, and so is one exported by the demo
before provenance was recorded (recognised by the demo's model name), because its results
on real radiographs are not meaningful and the page must say so.
"""

from __future__ import annotations

from typing import Any, Final

from model.bundle import EncoderBundle

#: The demo's model name (``convirt demo``); kept here so the service needs no command code.
DEMO_MODEL_NAME: Final = "convirt-demo"

SYNTHETIC_WARNING: Final = (
    "This demo model was trained on synthetic images only: its results on real "
    "radiographs are not meaningful."
)


def serving_model(bundle: EncoderBundle) -> dict[str, Any]:
    """The ``model`` object of ``/ready``: identity, provenance and a warning if one is due."""
    provenance = bundle.provenance
    recorded = isinstance(bundle.manifest.get("provenance"), dict)
    synthetic = bool(provenance["synthetic_data"]) or (
        not recorded and bundle.name == DEMO_MODEL_NAME
    )
    return {
        "name": bundle.name,
        "model_id": bundle.model_id,
        "dim": bundle.dim,
        "origin": provenance["origin"],
        "source": provenance["source"],
        "training_data": provenance["training_data"],
        "synthetic_data": synthetic,
        "warning": SYNTHETIC_WARNING if synthetic else None,
    }
