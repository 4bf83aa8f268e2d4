"""The linear probe: label fractions drawn per patient, the probes' known answers, the table.

The feature spaces here read the label straight off the pixels (informative) or ignore
them (noise), so the expected ordering of the rows is known.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation.classification_report import write_linear_probe_report
from model.evaluation.errors import ProtocolError
from model.evaluation.features import FeatureSpace
from model.evaluation.labelled import LabelledRecord, assign_splits, read_labelled
from model.evaluation.linear_probe import (
    LinearProbeOptions,
    draw_patients,
    probe_binary,
    probe_multiclass,
    run_linear_probe,
)


def _records(patients: int, per_patient: int, split: str | None = "train") -> list[LabelledRecord]:
    return [
        LabelledRecord(
            path=f"/x/{p}_{i}.png",
            labels={},
            patient_id=f"p{p}",
            split=split,
            where=f"row {p}.{i}",
        )
        for p in range(patients)
        for i in range(per_patient)
    ]


def test_fractions_are_drawn_per_patient() -> None:
    records = _records(200, 3)
    picked = draw_patients(records, 0.01, 0, seed=0)
    patients = {records[i].patient_id for i in picked}
    assert len(patients) == 2  # 1 % of 200 patients
    # Every image of a drawn patient comes along, none of any other patient.
    assert sorted(picked) == [i for i, r in enumerate(records) if r.patient_id in patients]
    draws = [frozenset(draw_patients(records, 0.1, d, seed=0)) for d in range(3)]
    assert all(len(d) == 60 for d in draws)
    assert len(set(draws)) == 3  # three different draws
    assert draw_patients(records, 0.1, 1, seed=0) == sorted(draws[1])  # reproducible
    assert draw_patients(records, 1.0, 0, seed=0) == list(range(len(records)))
    assert len(draw_patients(records, 0.001, 0, seed=0)) == 3  # at least one patient


def test_assigned_splits_keep_each_patient_in_one_split() -> None:
    records = assign_splits(_records(300, 2, split=None), seed=4)
    by_patient: dict[str, set[str | None]] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, set()).add(record.split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    counts = {s: sum(r.split == s for r in records) for s in ("train", "validate", "test")}
    assert 0.6 < counts["train"] / len(records) < 0.8
    assert counts["validate"] > 0
    assert counts["test"] > 0


def test_binary_probe_known_answers() -> None:
    rng = np.random.default_rng(0)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.random(n) < 0.4
        x = rng.normal(size=(n, 6)).astype(np.float32)
        x[:, 0] += 4.0 * y  # one strongly informative dimension
        return x, y

    score, c = probe_binary(part(60), part(40), part(80), (0.01, 1.0), 200)
    assert score > 0.97
    assert c in (0.01, 1.0)
    x, _ = part(30)
    # A training draw with one class only predicts its prevalence: AUROC one half.
    score, c = probe_binary((x, np.zeros(30, bool)), part(40), part(80), (1.0,), 200)
    assert score == 0.5
    assert c is None


def test_multiclass_probe_known_answer() -> None:
    rng = np.random.default_rng(1)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, size=n)
        x = rng.normal(scale=0.1, size=(n, 3)).astype(np.float32)
        x[np.arange(n), y] += 1.0
        return x, y

    accuracy, c = probe_multiclass(part(60), part(30), part(60), (1.0,), 500)
    assert accuracy == 1.0
    assert c == 1.0


def _corpus(tmp_path: Path) -> Path:
    """60 patients × 2 images; the left half of an image is bright iff Edema, the right
    half iff Cardiomegaly."""
    rng = np.random.default_rng(2)
    rows = []
    for patient in range(60):
        split = "test" if patient < 15 else "validate" if patient < 25 else "train"
        for study in range(2):
            edema, cardio = rng.random() < 0.4, rng.random() < 0.4
            pixels = rng.random((8, 8)) * 0.2
            pixels[:, :4] += 0.7 * edema
            pixels[:, 4:] += 0.7 * cardio
            name = f"images/{patient}_{study}.png"
            (tmp_path / "images").mkdir(exist_ok=True)
            Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255)).save(tmp_path / name)
            labels = {"Edema": float(edema), "Cardiomegaly": float(cardio)}
            rows.append([name, "", f"p{patient}", split, json.dumps(labels)])
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report", "patient_id", "split", "labels"])
        writer.writerows(rows)
    return manifest


def _space(name: str, informative: bool) -> FeatureSpace:
    def encode(images: Sequence[np.ndarray], size: int) -> np.ndarray:
        if informative:
            rows = [[img[:, :4].mean(), img[:, 4:].mean(), 0.1] for img in images]
        else:
            rows = [[float(img.sum() * 1e3 % 1.0), 0.3, 0.1] for img in images]
        return np.asarray(rows, dtype=np.float32)

    return FeatureSpace(cache_key=f"sha256:{name}", encode=encode, description={"n": name})


def test_linear_probe_ranks_informative_features_above_noise(tmp_path: Path) -> None:
    records = read_labelled(_corpus(tmp_path))
    options = LinearProbeOptions(fractions=(0.1, 1.0), draws=3, c_grid=(0.1, 10.0))
    result = run_linear_probe(
        records,
        {"model": _space("good", True), "random_init": _space("noise", False)},
        ["Edema", "Cardiomegaly", "Pneumothorax"],
        model_id="sha256:test",
        options=options,
    )
    assert result.task == "multi-label"
    assert result.metric == "auroc"
    # Pneumothorax is never labelled positive: it is left out rather than scored.
    assert result.findings == ("Edema", "Cardiomegaly")
    good, noise = result.rows["model"], result.rows["random_init"]
    assert good["100%"].mean > 0.95
    assert len(good["100%"].scores) == 1
    assert len(good["10%"].scores) == 3
    assert len(good["10%"].images) == 3
    assert noise["100%"].mean < 0.75
    # 10 % of the 35 training patients is 4 patients, 8 images, never a test image.
    assert good["10%"].images == [8, 8, 8]
    document = result.to_dict()
    assert document["results"]["linear_probe"]["model"]["mean"]["auroc@100%"] > 0.95
    report = write_linear_probe_report(result, tmp_path / "report")
    assert report.is_file()
    assert (tmp_path / "report" / "linear_probe.png").is_file()
    table = (tmp_path / "report" / "report.md").read_text()
    assert "| dataset | method | 10% | 100% |" in table
    assert "| corpus | ConVIRT (this bundle) |" in table


def test_the_drawn_training_images_never_overlap_the_test_split(tmp_path: Path) -> None:
    records = assign_splits(read_labelled(_corpus(tmp_path)))
    train = [r for r in records if r.split == "train"]
    test_patients = {r.patient_id for r in records if r.split == "test"}
    for fraction in (0.01, 0.1, 1.0):
        for draw in range(3):
            picked = {train[i].patient_id for i in draw_patients(train, fraction, draw, 0)}
            assert picked
            assert not picked & test_patients


def test_a_probe_needs_all_three_splits(tmp_path: Path) -> None:
    records = [r for r in read_labelled(_corpus(tmp_path)) if r.split != "validate"]
    with pytest.raises(ProtocolError) as missing:
        run_linear_probe(records, {"model": _space("good", True)}, ["Edema"], model_id="m")
    assert missing.value.code == "not_enough_images"


def test_one_positive_finding_per_image_is_probed_as_multi_class(tmp_path: Path) -> None:
    """COVIDx-style labels: each image is exactly one of the classes; scored by accuracy."""
    rng = np.random.default_rng(3)
    rows = []
    (tmp_path / "images").mkdir()
    for patient in range(45):
        split = "test" if patient < 12 else "validate" if patient < 20 else "train"
        pneumonia = patient % 2 == 1
        pixels = rng.random((8, 8)) * 0.2
        pixels[:, :4] += 0.7 * pneumonia
        name = f"images/{patient}.png"
        Image.fromarray(np.uint8(np.clip(pixels, 0, 1) * 255)).save(tmp_path / name)
        labels = {"No Finding": float(not pneumonia), "Pneumonia": float(pneumonia)}
        rows.append([name, "", f"p{patient}", split, json.dumps(labels)])
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "report", "patient_id", "split", "labels"])
        writer.writerows(rows)
    result = run_linear_probe(
        read_labelled(manifest),
        {"model": _space("good", True)},
        ["No Finding", "Pneumonia"],
        model_id="sha256:test",
        options=LinearProbeOptions(fractions=(1.0,), c_grid=(1.0,)),
    )
    assert result.task == "multi-class"
    assert result.metric == "accuracy"
    assert result.rows["model"]["100%"].mean == 1.0
    assert "accuracy@100%" in result.to_dict()["results"]["linear_probe"]["model"]["mean"]
    with pytest.raises(ProtocolError):
        run_linear_probe(
            read_labelled(_corpus(_mkdir(tmp_path / "multi"))),
            {"model": _space("good", True)},
            ["Edema", "Cardiomegaly"],
            model_id="sha256:test",
            options=LinearProbeOptions(task="multi-class"),
        )


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path
