"""Text→image retrieval quality of an encoder bundle on held-out synthetic studies.

Run as a script after training and exporting::

    python tests/benchmarks/quality_synthetic.py --bundle BUNDLE_DIR --corpus /tmp/synth2k

It mirrors the shape of the CheXpert 8x200 protocol at small scale: for each of the eight
categories the candidate pool holds the same number of held-out studies (``--splits``,
default ``test``: never trained on, never used for model selection) whose only positive
among the eight categories is that one, so a random ranking scores 1/8 = 12.5%. Five
free-text queries per category are embedded with ``encode_texts``; images with
``encode_images``; the ranking is a numpy dot product. Prints one JSON object with
precision@5 and @10 per category and averaged, and the chance level. A second, unbalanced
score over every held-out study (chance = each category's prevalence) is included.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from model.bundle import EncoderBundle  # noqa: E402
from model.data.manifest import PairedRecord, read_manifest  # noqa: E402
from model.inputs.decode import decode_file  # noqa: E402
from model.labels import CHEXPERT_8X200_CATEGORIES, POSITIVE  # noqa: E402

#: Radiologist-style phrasings, written for this check (not the generator's sentences).
QUERIES: dict[str, tuple[str, ...]] = {
    "Atelectasis": (
        "Bibasilar atelectasis.",
        "Subsegmental atelectasis at the left lung base.",
        "Plate-like atelectasis in the right lower lobe.",
        "Linear atelectasis at the lung bases.",
        "Volume loss with atelectasis.",
    ),
    "Cardiomegaly": (
        "Cardiomegaly.",
        "The heart is enlarged.",
        "Moderate enlargement of the cardiac silhouette.",
        "Mild cardiomegaly.",
        "Enlarged heart size.",
    ),
    "Edema": (
        "Pulmonary edema.",
        "Mild interstitial edema.",
        "Vascular congestion with pulmonary edema.",
        "Moderate pulmonary edema.",
        "Diffuse interstitial opacities consistent with edema.",
    ),
    "Fracture": (
        "Rib fracture.",
        "Acute fracture of the left ribs.",
        "Displaced clavicle fracture.",
        "Nondisplaced right rib fracture.",
        "Fractured rib on the right.",
    ),
    "No Finding": (
        "Normal chest radiograph.",
        "No acute cardiopulmonary process.",
        "The lungs are clear and the heart is normal.",
        "No acute abnormality.",
        "Normal heart size, clear lungs, no effusion.",
    ),
    "Pleural Effusion": (
        "Pleural effusion.",
        "Small left pleural effusion.",
        "Bilateral pleural effusions.",
        "Moderate right pleural effusion.",
        "Blunting of the costophrenic angle from fluid.",
    ),
    "Pneumonia": (
        "Pneumonia.",
        "Right lower lobe pneumonia.",
        "Consolidation consistent with pneumonia.",
        "Airspace opacity concerning for pneumonia.",
        "Left basilar pneumonia.",
    ),
    "Pneumothorax": (
        "Pneumothorax.",
        "Small right apical pneumothorax.",
        "Left pneumothorax.",
        "Large pneumothorax.",
        "Visible pleural line consistent with pneumothorax.",
    ),
}


def positives(record: PairedRecord) -> list[str]:
    return [c for c in CHEXPERT_8X200_CATEGORIES if record.labels.get(c) == POSITIVE]


def precision_at(ranking: np.ndarray, relevant: np.ndarray, k: int) -> float:
    return float(relevant[ranking[:k]].mean())


def score(
    bundle: EncoderBundle, pool: list[PairedRecord], image_vectors: np.ndarray
) -> dict[str, Any]:
    """P@5/P@10 of every query over ``pool``, averaged per category and overall."""
    per_category: dict[str, dict[str, float]] = {}
    for category, queries in QUERIES.items():
        relevant = np.array([record.labels.get(category) == POSITIVE for record in pool])
        text_vectors = bundle.encode_texts(list(queries))  # (Q, D)
        scores = text_vectors @ image_vectors.T  # (Q, N)
        rankings = np.argsort(-scores, axis=1, kind="stable")
        per_category[category] = {
            "p_at_5": float(np.mean([precision_at(r, relevant, 5) for r in rankings])),
            "p_at_10": float(np.mean([precision_at(r, relevant, 10) for r in rankings])),
            "chance": float(relevant.mean()),
        }
    return {
        "per_category": per_category,
        "mean_p_at_5": float(np.mean([v["p_at_5"] for v in per_category.values()])),
        "mean_p_at_10": float(np.mean([v["p_at_10"] for v in per_category.values()])),
        "mean_chance": float(np.mean([v["chance"] for v in per_category.values()])),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--corpus", type=Path, required=True, help="synthetic corpus folder")
    parser.add_argument("--splits", nargs="+", default=["test"])
    parser.add_argument("--per-category", type=int, help="pool images per category")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    bundle = EncoderBundle.load(args.bundle)
    held_out = [r for r in read_manifest(args.corpus / "manifest.csv") if r.split in args.splits]
    single: dict[str, list[PairedRecord]] = {c: [] for c in CHEXPERT_8X200_CATEGORIES}
    for record in held_out:
        found = positives(record)
        if len(found) == 1:
            single[found[0]].append(record)
    per_category = args.per_category or min(len(v) for v in single.values())
    rng = random.Random(args.seed)
    balanced = [r for c in CHEXPERT_8X200_CATEGORIES for r in rng.sample(single[c], per_category)]

    vectors = bundle.encode_images([decode_file(r.image_path).pixels for r in held_out])
    index_of = {r.study_id: i for i, r in enumerate(held_out)}
    balanced_vectors = vectors[[index_of[r.study_id] for r in balanced]]
    result = {
        "benchmark": "quality_synthetic",
        "model_id": bundle.model_id,
        "splits": args.splits,
        "queries_per_category": {c: len(q) for c, q in QUERIES.items()},
        "balanced": {
            "pool": len(balanced),
            "per_category": per_category,
            **score(bundle, balanced, balanced_vectors),
        },
        "all_held_out": {"pool": len(held_out), **score(bundle, held_out, vectors)},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
