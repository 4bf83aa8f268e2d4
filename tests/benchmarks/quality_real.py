"""Image→image retrieval on the real radiographs of ``../shared/data``: does a model see?

Run as a script::

    python tests/benchmarks/quality_real.py --bundle demo=/path/to/bundle [--bundle new=DIR]

For every bundle it scores the bundle's image embeddings and, once, the ImageNet backbone
the first ConVIRT bundle started from (its untrained image tower's pooled features), on
four tasks. Each task's pool is its labelled images plus pydicom's two distinct real CR
chest radiographs (``RG1_UNCR``, ``RG3_UNCR``) as distractors that are never correct:

- ``kermany/label``: 16 pediatric radiographs, normal vs bacterial pneumonia (8 + 8);
- ``figure1/finding``: the Figure 1 COVID-19 images with a finding (COVID-19, pneumonia,
  no finding);
- ``figure1/view``: those with a view, AP (erect or not) vs PA;
- ``figure1/patient``: the six patients with two images (``a``/``b``): is the other one
  the nearest?

Every labelled image is a query in turn (leave-one-out); precision@k counts retrieved
images with the query's label. These sets are small, so besides the mean over queries the
script prints the spread over query choices: the standard deviation over queries and a
bootstrap 90% interval of the mean (queries resampled with replacement). ``chance`` is the
expected precision of a random ranking. Prints a table and one JSON object, with the load
average (the machine is shared; figures do not depend on it, only the run time).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from model.bundle import EncoderBundle  # noqa: E402
from model.inputs.decode import decode_file  # noqa: E402

logger = logging.getLogger("quality_real")

SHARED = ROOT.parent / "shared" / "data"
DISTRACTORS = ("RG1_UNCR.dcm", "RG3_UNCR.dcm")
KS = (1, 5, 10)
BOOTSTRAP = 2000


@dataclass(frozen=True)
class Image:
    """One real radiograph: where it is and its labels per task (absent: unlabelled)."""

    name: str
    path: Path
    labels: dict[str, str]


def kermany_images(root: Path) -> list[Image]:
    base = root / "kermany-16"
    with (base / "labels.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return [
        Image(f"kermany/{r['file']}", base / "images" / r["file"], {"kermany/label": r["label"]})
        for r in rows
    ]


def figure1_images(root: Path) -> list[Image]:
    base = root / "figure1-covid"
    # The metadata file is Latin-1 (degree signs in the notes).
    with (base / "metadata.csv").open(encoding="latin-1") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        pid = row["patientid"]
        labels: dict[str, str] = {}
        if row["finding"]:
            labels["figure1/finding"] = row["finding"]
        if row["view"]:
            labels["figure1/view"] = "PA" if row["view"].startswith("PA") else "AP"
        if pid[-1] in "ab":
            labels["figure1/patient"] = pid[:-1]
        out.append(Image(f"figure1/{pid}", base / "images" / f"{pid}.png", labels))
    return out


def distractor_images() -> list[Image]:
    from pydicom.data import get_testdata_file

    out = []
    for name in DISTRACTORS:
        # download=False: the files ship in pydicom-data; never reach for the network.
        path = get_testdata_file(name, download=False)
        if path is None:
            raise SystemExit(f"pydicom-data lacks {name}: pip install pydicom-data")
        out.append(Image(f"pydicom/{name}", Path(str(path)), {}))
    return out


def precision_table(
    vectors: np.ndarray, labels: Sequence[str | None], ks: Sequence[int], rng: np.random.Generator
) -> dict[str, Any]:
    """Leave-one-out P@k of every labelled row against all other rows (None never matches)."""
    queries = [i for i, label in enumerate(labels) if label is not None]
    scores = vectors @ vectors.T  # (N, N) cosine
    np.fill_diagonal(scores, -np.inf)
    result: dict[str, Any] = {"queries": len(queries), "pool": len(labels) - 1}
    for k in ks:
        if k > len(labels) - 1:
            continue
        per_query = []
        chance = []
        for q in queries:
            top = np.argsort(-scores[q], kind="stable")[:k]
            per_query.append(float(np.mean([labels[j] == labels[q] for j in top])))
            others = [labels[j] == labels[q] for j in range(len(labels)) if j != q]
            chance.append(float(np.mean(others)))
        values = np.array(per_query)
        draws = rng.choice(values, size=(BOOTSTRAP, len(values)), replace=True).mean(axis=1)
        result[f"P@{k}"] = {
            "mean": round(float(values.mean()), 3),
            "std": round(float(values.std()), 3),
            "ci90": [
                round(float(np.quantile(draws, 0.05)), 3),
                round(float(np.quantile(draws, 0.95)), 3),
            ],
            "chance": round(float(np.mean(chance)), 3),
        }
    return result


def task_rows(images: Sequence[Image], task: str) -> tuple[list[int], list[str | None]]:
    """Indices of the task's pool (its labelled images, then the distractors) and labels."""
    chosen = [i for i, im in enumerate(images) if task in im.labels]
    chosen += [i for i, im in enumerate(images) if im.name.startswith("pydicom/")]
    return chosen, [images[i].labels.get(task) for i in chosen]


def encoders(specs: Sequence[str]) -> dict[str, Callable[[list[np.ndarray]], np.ndarray]]:
    """The backbone baseline of the first ConVIRT bundle, then each bundle's own images."""
    from model.evaluation.baseline import InitialBackbone

    out: dict[str, Callable[[list[np.ndarray]], np.ndarray]] = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        bundle = EncoderBundle.load(path, device="cpu")
        if "imagenet-backbone" not in out and bundle.config["model"].get("imported") is None:
            base = InitialBackbone.from_bundle(bundle)
            out["imagenet-backbone"] = base.image_backbone_features
        out[name] = bundle.encode_images
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--bundle", action="append", required=True, metavar="NAME=DIR", help="a bundle to score"
    )
    parser.add_argument("--data", type=Path, default=SHARED, help="the shared data folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    images = kermany_images(args.data) + figure1_images(args.data) + distractor_images()
    pixels = [decode_file(im.path).pixels for im in images]
    tasks = ("kermany/label", "figure1/finding", "figure1/view", "figure1/patient")
    results: dict[str, Any] = {}
    for name, encode in encoders(args.bundle).items():
        started = time.perf_counter()
        vectors = np.asarray(encode(pixels), dtype=np.float32)  # (N, D), unit rows
        rng = np.random.default_rng(args.seed)
        results[name] = {}
        for task in tasks:
            rows, labels = task_rows(images, task)
            results[name][task] = precision_table(vectors[rows], labels, KS, rng)
        results[name]["embed_s"] = round(time.perf_counter() - started, 1)
    report = {"images": len(images), "loadavg": os.getloadavg(), "results": results}
    for task in tasks:
        for k in KS:
            key = f"P@{k}"
            cells = [
                f"{name}: {r[task][key]['mean']:.3f} ±{r[task][key]['std']:.2f} "
                f"[{r[task][key]['ci90'][0]:.2f}, {r[task][key]['ci90'][1]:.2f}]"
                for name, r in results.items()
                if key in r[task]
            ]
            if cells:
                chance = next(iter(results.values()))[task][key]["chance"]
                sys.stdout.write(f"{task} {key} (chance {chance:.3f}): " + " | ".join(cells) + "\n")
    sys.stdout.write(json.dumps(report) + "\n")
    return report


if __name__ == "__main__":
    main()
