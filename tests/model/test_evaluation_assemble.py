"""The protocol that `convirt evaluate` and the service's evaluation runs both score."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data.manifest import PairedRecord, write_manifest
from model.evaluation.assemble import OFFICIAL, assemble_protocol
from model.evaluation.errors import EvaluationError, ProtocolError
from model.evaluation.protocol import RetrievalProtocol, TextQuery, read_chexpert_8x200
from model.evaluation.queries import default_text_queries
from model.evaluation.sampling import LabelledImage
from model.labels import CHEXPERT_8X200_CATEGORIES


@pytest.fixture(scope="module")
def official_dir(shared_dir: Path) -> Path:
    return shared_dir / "protocols" / "chexpert-8x200"


def _touch(root: Path, paths: list[str]) -> None:
    for path in paths:
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")


def _one_label_each(per_category: int) -> list[LabelledImage]:
    """``per_category`` images for each CheXpert 8x200 category, one positive label each."""
    return [
        LabelledImage(path=f"{index}/{n}.png", labels={category: 1.0}, where=f"image {index}")
        for index, category in enumerate(CHEXPERT_8X200_CATEGORIES)
        for n in range(per_category)
    ]


def test_official_protocol_is_the_files_validated_against_the_root(
    official_dir: Path, tmp_path: Path
) -> None:
    expected = read_chexpert_8x200(official_dir).image_paths()
    _touch(tmp_path, expected[1:])
    with pytest.raises(ProtocolError) as info:
        assemble_protocol(OFFICIAL, root=tmp_path, protocol_dir=official_dir)
    assert info.value.code == "image_missing"
    _touch(tmp_path, expected[:1])
    protocol = assemble_protocol(OFFICIAL, root=tmp_path, protocol_dir=official_dir)
    assert protocol.name == OFFICIAL
    assert protocol.image_paths() == expected
    with pytest.raises(EvaluationError, match="needs the CheXpert root"):
        assemble_protocol(OFFICIAL, protocol_dir=official_dir)


def test_sampled_protocol_defaults_to_the_eight_categories_and_built_in_queries(
    tmp_path: Path,
) -> None:
    images = _one_label_each(3)
    _touch(tmp_path, [image.path for image in images])

    def assemble() -> RetrievalProtocol:
        return assemble_protocol(
            "stored",
            root=tmp_path,
            images=images,
            candidates_per_category=2,
            queries_per_category=1,
        )

    protocol = assemble()
    assert protocol.name == "stored"
    assert protocol.categories == tuple(CHEXPERT_8X200_CATEGORIES)
    built_in = default_text_queries(CHEXPERT_8X200_CATEGORIES)
    assert [(q.category, q.text) for q in protocol.text_queries] == [
        (q.category, q.text) for q in built_in
    ]
    assert len(protocol.image_candidates) == 2 * len(CHEXPERT_8X200_CATEGORIES)
    # Relative paths are checked under the root before anything is embedded.
    (tmp_path / protocol.image_candidates[0].path).unlink()
    with pytest.raises(ProtocolError) as info:
        assemble_protocol(
            "stored",
            root=tmp_path,
            images=images,
            candidates_per_category=2,
            queries_per_category=1,
        )
    assert info.value.code == "image_missing"


def test_sampled_protocol_from_a_manifest_with_chosen_categories_and_queries(
    tmp_path: Path,
) -> None:
    records = [
        PairedRecord(
            image_path=tmp_path / f"{category}-{n}.png",
            report="",
            labels={category: 1.0},
            patient_id=f"p{n}",
            study_id=f"s{category}{n}",
        )
        for category in ("Edema", "Fracture")
        for n in range(3)
    ]
    manifest = write_manifest(records, tmp_path / "corpus.csv")
    queries = [TextQuery(category="Edema", text="interstitial edema", where="query 1")]
    protocol = assemble_protocol(
        "manifest",
        manifest=manifest,
        categories=["Edema", "Fracture"],
        text_queries=queries,
        candidates_per_category=2,
        queries_per_category=1,
        seed=3,
        params={"manifest": str(manifest)},
    )
    assert protocol.categories == ("Edema", "Fracture")
    assert protocol.text_queries == tuple(queries)
    assert protocol.params["manifest"] == str(manifest)
    assert protocol.params["seed"] == 3
    with pytest.raises(EvaluationError, match="needs a manifest or labelled images"):
        assemble_protocol("manifest", categories=["Edema"])
