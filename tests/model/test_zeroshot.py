"""Prompt sets, prompt-ensemble probabilities, the k-NN vote and the zero-shot protocol.

The encoders here are tiny and exact: text and image vectors are fixed by hand, so every
probability and vote has a known answer.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.evaluation.labelled import COMPETITION_FINDINGS, read_labelled
from model.evaluation.zeroshot import CHANCE, KNN, PROMPTS, knn_votes, run_zero_shot
from model.labels import CHEXPERT_LABELS
from model.prompts import (
    DEFAULT_PROMPT_SET,
    PromptSetError,
    load_prompt_set,
    parse_prompt_set,
    read_prompt_set,
    shipped_prompt_sets,
)
from model.zeroshot import PromptClassifier


class TableEncoder:
    """Texts map to fixed unit vectors; an image is embedded as its mean-pixel direction."""

    model_id = "sha256:" + "12" * 32
    temperature = 0.1

    def __init__(self, texts: dict[str, Sequence[float]]) -> None:
        self.texts = {k: np.asarray(v, dtype=np.float32) for k, v in texts.items()}

    def encode_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        rows = np.stack([self.texts[t] for t in texts])
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    def encode_images(self, images: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        # Bright image → e0, dark image → e1; the share of the two follows the brightness.
        rows = [[float(img.mean()), 1.0 - float(img.mean())] for img in images]
        out = np.asarray(rows, dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def _one_finding_set(positive: list[str], negative: list[str]) -> object:
    return parse_prompt_set(
        {
            "id": "test-set",
            "version": 2,
            "findings": [{"name": "Edema", "positive": positive, "negative": negative}],
        },
        "test",
    )


def test_the_shipped_sets_load_and_cover_the_chexpert_observations() -> None:
    assert DEFAULT_PROMPT_SET in shipped_prompt_sets()
    default = load_prompt_set()
    assert default.id == "chexpert-14"
    assert default.version >= 1
    assert set(default.names) == set(CHEXPERT_LABELS)
    assert all(len(f.positive) >= 2 and len(f.negative) >= 2 for f in default.findings)
    short = load_prompt_set("chexpert-5-short")
    assert set(short.names) == set(COMPETITION_FINDINGS)


def test_unknown_and_malformed_prompt_sets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PromptSetError) as unknown:
        load_prompt_set("../configs/paper")
    assert unknown.value.code == "unknown_prompt_set"
    for document in (
        {"id": "x", "version": 1, "findings": []},
        {
            "id": "Bad Id",
            "version": 1,
            "findings": [{"name": "A", "positive": ["a"], "negative": ["b"]}],
        },
        {
            "id": "x",
            "version": 0,
            "findings": [{"name": "A", "positive": ["a"], "negative": ["b"]}],
        },
        {"id": "x", "version": 1, "findings": [{"name": "A", "positive": [], "negative": ["b"]}]},
        {
            "id": "x",
            "version": 1,
            "findings": [
                {"name": "A", "positive": ["a"], "negative": ["b"]},
                {"name": "A", "positive": ["c"], "negative": ["d"]},
            ],
        },
    ):
        with pytest.raises(PromptSetError) as bad:
            parse_prompt_set(document, "doc")
        assert bad.value.code == "invalid_prompt_set"
    broken = tmp_path / "broken.yaml"
    broken.write_text("id: [unclosed", encoding="utf-8")
    with pytest.raises(PromptSetError):
        read_prompt_set(broken)


def test_probability_is_the_tempered_softmax_of_the_ensemble_similarities() -> None:
    prompt_set = _one_finding_set(["p1", "p2"], ["n1"])
    # p1 and p2 average to e0 once re-normalised; n1 is e1.
    encoder = TableEncoder({"p1": [1.0, 0.2], "p2": [1.0, -0.2], "n1": [0.0, 1.0]})
    classifier = PromptClassifier.build(encoder, prompt_set)  # type: ignore[arg-type]
    np.testing.assert_allclose(classifier.positive, [[1.0, 0.0]], atol=1e-6)
    image = np.array([[0.8, 0.6]])
    expected = math.exp(0.8 / 0.1) / (math.exp(0.8 / 0.1) + math.exp(0.6 / 0.1))
    assert classifier.probabilities(image)[0, 0] == pytest.approx(expected)
    # Equidistant from both ensembles: exactly one half; far on either side: 0 or 1.
    assert classifier.probabilities(np.array([0.6, 0.6]))[0, 0] == pytest.approx(0.5)
    extremes = classifier.probabilities(np.array([[1.0, -1.0], [-1.0, 1.0]]) * 1e3)
    assert extremes[0, 0] == pytest.approx(1.0)
    assert extremes[1, 0] == pytest.approx(0.0)


def test_knn_votes_count_known_labels_of_the_k_nearest_other_patients() -> None:
    pool = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.95, 0.05]], dtype=np.float32)
    positive = np.array([[True], [False], [True], [True]])
    known = np.array([[True], [True], [True], [False]])
    query = np.array([[1.0, 0.0]], dtype=np.float32)
    fractions, voters = knn_votes(
        query,
        pool,
        positive,
        known,
        3,
        query_patients=["q"],
        pool_patients=["a", "b", "c", "d"],
    )
    # Nearest three: 0 (positive), 3 (uncertain, abstains), 1 (negative).
    assert voters[0, 0] == 2
    assert fractions[0, 0] == pytest.approx(0.5)
    # The query's own patient never votes: with pool image 0 from patient "q", 3 steps in.
    fractions, voters = knn_votes(
        query,
        pool,
        positive,
        known,
        3,
        query_patients=["q"],
        pool_patients=["q", "b", "c", "d"],
    )
    assert voters[0, 0] == 2
    assert fractions[0, 0] == pytest.approx(0.5)


def _png(path: Path, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), int(value * 255), dtype=np.uint8)).save(path)


def test_zero_shot_on_a_corpus_whose_brightness_is_the_label(tmp_path: Path) -> None:
    """Edema-positive images are bright: prompts and k-NN both rank perfectly."""
    rows = []
    rng = np.random.default_rng(0)
    for i in range(40):
        edema = i % 3 == 0
        brightness = (0.7 + 0.25 * rng.random()) if edema else (0.05 + 0.25 * rng.random())
        _png(tmp_path / "images" / f"{i}.png", brightness)
        rows.append(
            {
                "image": f"images/{i}.png",
                "report": "",
                "patient_id": f"p{i}",
                "split": "test" if i < 20 else "train",
                "labels": '{"Edema": %s}' % (1.0 if edema else 0.0),
            }
        )
    manifest = tmp_path / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "report", "patient_id", "split", "labels"])
        writer.writeheader()
        writer.writerows(rows)
    encoder = TableEncoder({"p": [1.0, 0.0], "n": [0.0, 1.0]})
    prompt_set = _one_finding_set(["p"], ["n"])
    result = run_zero_shot(read_labelled(manifest), encoder, prompt_set)  # type: ignore[arg-type]
    assert result.findings == ("Edema",)
    assert result.counts["images"] == 20
    assert result.counts["knn_pool"] == 20
    assert result.scores[PROMPTS]["Edema"].auroc == 1.0
    assert result.scores[KNN]["Edema"].auroc == 1.0
    assert result.scores[PROMPTS]["Edema"].f1 == 1.0
    assert abs(result.scores[CHANCE]["Edema"].auroc - 0.5) < 0.35
    document = result.to_dict()
    assert document["results"]["zero_shot"]["prompts"]["mean"]["auroc_competition"] == 1.0
    assert document["prompt_set"] == {"id": "test-set", "version": 2, "description": ""}


def test_chexpert_valid_csv_is_read_as_downloaded(tmp_path: Path) -> None:
    from model.data.synthetic import write_chexpert_tree

    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]
    lines = []
    for patient in range(4):
        labels = ["0.0"] * len(CHEXPERT_LABELS)
        labels[CHEXPERT_LABELS.index("Cardiomegaly")] = "1.0" if patient % 2 else "0.0"
        labels[CHEXPERT_LABELS.index("Edema")] = "-1.0" if patient == 3 else ""
        path = f"CheXpert-v1.0-small/valid/patient6454{patient}/study1/view1_frontal.jpg"
        lines.append([path, "Female", "60", "Frontal", "PA", *labels])
    valid = folder / "valid.csv"
    with valid.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(lines)
    write_chexpert_tree(tmp_path, [valid], size=64)
    records = read_labelled(valid)
    assert [r.patient_id for r in records] == [f"patient6454{i}" for i in range(4)]
    assert all(Path(r.path).is_file() and r.split is None for r in records)
    assert [r.labels["Cardiomegaly"] for r in records] == [0.0, 1.0, 0.0, 1.0]
    assert records[0].labels["Edema"] is None
    assert records[3].labels["Edema"] == -1.0


def test_the_bundle_carries_its_training_temperature(bundle: object) -> None:
    from model.bundle import EncoderBundle

    assert isinstance(bundle, EncoderBundle)
    # Exported from a run with the default loss: τ = 0.1 is written into config.json.
    assert bundle.config["temperature"] == 0.1
    assert bundle.temperature == 0.1

    def with_config(config: dict[str, object]) -> EncoderBundle:
        return EncoderBundle(
            bundle.model,
            config=config,
            manifest=bundle.manifest,
            preprocessing=bundle.preprocessing,
            path=bundle.path,
            device=bundle.device,
        )

    assert with_config({**bundle.config, "temperature": 0.05}).temperature == 0.05
    # Bundles exported before the temperature was recorded: ConVIRT's default.
    older = {k: v for k, v in bundle.config.items() if k != "temperature"}
    assert with_config(older).temperature == 0.1


def test_knn_votes_do_not_depend_on_the_block_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import model.evaluation.zeroshot as zeroshot

    rng = np.random.default_rng(5)
    pool = rng.normal(size=(40, 8)).astype(np.float32)
    queries = rng.normal(size=(9, 8)).astype(np.float32)
    positive = rng.random((40, 3)) < 0.4
    known = rng.random((40, 3)) < 0.9
    query_patients = [f"p{i % 4}" for i in range(9)]
    pool_patients = [f"p{i % 6}" for i in range(40)]

    def votes() -> tuple[np.ndarray, np.ndarray]:
        return knn_votes(
            queries,
            pool,
            positive,
            known,
            7,
            query_patients=query_patients,
            pool_patients=pool_patients,
        )

    whole = votes()
    monkeypatch.setattr(zeroshot, "_KNN_BLOCK_CELLS", 2 * 40)  # two queries per block
    blocked = votes()
    np.testing.assert_array_equal(whole[0], blocked[0])
    np.testing.assert_array_equal(whole[1], blocked[1])
    assert (whole[1] <= 7).all()
    assert (whole[1] > 0).any()
