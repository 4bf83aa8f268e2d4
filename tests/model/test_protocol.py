"""The CheXpert 8x200 protocol files, their validation, and protocols drawn from a corpus."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from model.data.manifest import PairedRecord, write_manifest
from model.evaluation.errors import ProtocolError
from model.evaluation.protocol import (
    CHEXPERT_8X200,
    find_protocol_dir,
    read_chexpert_8x200,
    read_text_queries,
    validate_protocol,
)
from model.evaluation.queries import DEFAULT_TEXT_QUERIES, default_text_queries
from model.evaluation.sampling import LabelledImage, manifest_images, sample_protocol
from model.labels import CHEXPERT_8X200_CATEGORIES, CHEXPERT_LABELS


@pytest.fixture(scope="module")
def official_dir(shared_dir: Path) -> Path:
    return shared_dir / "protocols" / "chexpert-8x200"


@pytest.fixture
def protocol_copy(official_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "chexpert-8x200"
    shutil.copytree(official_dir, target)
    return target


def _edit_line(path: Path, line: int, old: str, new: str) -> None:
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert old in lines[line - 1]
    lines[line - 1] = lines[line - 1].replace(old, new, 1)
    path.write_text("".join(lines), encoding="utf-8")


def test_official_counts_and_categories(official_dir: Path) -> None:
    protocol = read_chexpert_8x200(official_dir)
    assert protocol.name == CHEXPERT_8X200
    assert protocol.categories == CHEXPERT_8X200_CATEGORIES
    counts = protocol.counts()
    assert counts["image_candidates"] == counts["text_candidates"] == 1600
    assert counts["image_queries"] == 80
    assert counts["text_queries"] == 40
    assert set(counts["image_candidates_positive"].values()) == {200}
    assert set(counts["image_queries_per_category"].values()) == {10}
    assert set(counts["text_queries_per_category"].values()) == {5}
    assert protocol.image_candidates[0].path.startswith("CheXpert-v1.0-small/train/")
    # Every CheXpert observation is a label column of the candidates.
    assert set(protocol.image_candidates[0].labels) == set(CHEXPERT_LABELS)
    assert "Blunting of the costophrenic angles represents pleural effusions." in {
        q.text for q in protocol.text_queries
    }
    validate_protocol(protocol)  # the official files pass every rule but the file check


def test_official_label_rule_and_disjointness(official_dir: Path) -> None:
    protocol = read_chexpert_8x200(official_dir)
    positive = protocol.positives(protocol.image_candidates)  # (1600, 8)
    # Each candidate is positive for exactly one of the eight categories...
    assert positive.sum(axis=1).tolist() == [1] * 1600
    # ...and, over all 14 labels, that is its only 1.0.
    for candidate in protocol.image_candidates:
        assert sum(value == 1.0 for value in candidate.labels.values()) == 1
    queries = {q.path for q in protocol.image_queries}
    assert len(queries) == 80
    assert not queries & {c.path for c in protocol.image_candidates}
    assert len(protocol.image_paths()) == 1680


def test_find_protocol_dir(official_dir: Path, tmp_path: Path) -> None:
    assert find_protocol_dir(official_dir) == official_dir.resolve()
    assert find_protocol_dir(official_dir.parent) == official_dir.resolve()
    with pytest.raises(ProtocolError) as info:
        find_protocol_dir(tmp_path)
    assert info.value.code == "protocol_file_missing"


def test_missing_image_names_the_file_and_row(official_dir: Path, tmp_path: Path) -> None:
    protocol = read_chexpert_8x200(official_dir)
    for path in protocol.image_paths()[1:]:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x")
    with pytest.raises(ProtocolError) as info:
        validate_protocol(protocol, tmp_path)
    assert info.value.code == "image_missing"
    message = str(info.value)
    assert protocol.image_candidates[0].path in message
    assert "image-retrieval/candidate.csv line 2" in message
    assert message.startswith("1 image(s) missing")
    first = tmp_path / protocol.image_paths()[0]
    first.parent.mkdir(parents=True, exist_ok=True)
    first.write_bytes(b"x")
    validate_protocol(protocol, tmp_path)


def test_category_absent_from_candidates(protocol_copy: Path) -> None:
    query = protocol_copy / "image-retrieval" / "query.csv"
    _edit_line(query, 12, "Cardiomegaly", "Lung Lesion")
    with pytest.raises(ProtocolError) as info:
        validate_protocol(read_chexpert_8x200(protocol_copy))
    assert info.value.code == "category_absent"
    assert "query.csv line 12" in str(info.value)
    assert "'Lung Lesion'" in str(info.value)
    _edit_line(query, 12, "Lung Lesion", "Spleen")
    with pytest.raises(ProtocolError, match="not a label of the candidates") as info:
        validate_protocol(read_chexpert_8x200(protocol_copy))
    assert info.value.code == "category_absent"


def test_query_among_candidates(protocol_copy: Path) -> None:
    candidates = (protocol_copy / "image-retrieval" / "candidate.csv").read_text().splitlines()
    candidate_path = candidates[6].split(",")[0]  # line 7
    query = protocol_copy / "image-retrieval" / "query.csv"
    lines = query.read_text().splitlines()
    old_path = lines[2].split(",", 1)[1]  # line 3
    _edit_line(query, 3, old_path, candidate_path)
    with pytest.raises(ProtocolError) as info:
        validate_protocol(read_chexpert_8x200(protocol_copy))
    assert info.value.code == "query_in_candidates"
    assert "query.csv line 3" in str(info.value)
    assert "candidate.csv line 7" in str(info.value)
    assert candidate_path in str(info.value)


def test_duplicate_candidate_and_bad_label(protocol_copy: Path) -> None:
    file = protocol_copy / "text-retrieval" / "candidate.csv"
    lines = file.read_text().splitlines(keepends=True)
    lines.insert(10, lines[4])
    file.write_text("".join(lines))
    with pytest.raises(ProtocolError) as info:
        validate_protocol(read_chexpert_8x200(protocol_copy))
    assert info.value.code == "duplicate_candidate"
    assert "text-retrieval/candidate.csv line 11" in str(info.value)
    assert "line 5" in str(info.value)
    _edit_line(file, 3, ",1.0,", ",2.0,")
    with pytest.raises(ProtocolError, match=r"candidate.csv line 3: column 'Fracture'") as info:
        read_chexpert_8x200(protocol_copy)
    assert info.value.code == "protocol_file_invalid"


def test_missing_protocol_file(protocol_copy: Path) -> None:
    (protocol_copy / "text-retrieval" / "query.csv").unlink()
    with pytest.raises(ProtocolError, match=r"text-retrieval/query\.csv") as info:
        read_chexpert_8x200(protocol_copy)
    assert info.value.code == "protocol_file_missing"


def test_read_text_queries(official_dir: Path, tmp_path: Path) -> None:
    official = read_text_queries(official_dir / "text-retrieval" / "query.csv")
    assert len(official) == 40
    assert official[0].category == "Pneumothorax"
    own = tmp_path / "queries.csv"
    own.write_text("category,text\nEdema,Hazy perihilar opacities.\n\n")
    (query,) = read_text_queries(own)
    assert (query.category, query.text) == ("Edema", "Hazy perihilar opacities.")
    assert query.where.endswith("queries.csv line 2")
    bad = tmp_path / "bad.csv"
    bad.write_text("label,sentence\nEdema,x\n")
    with pytest.raises(ProtocolError, match="line 1"):
        read_text_queries(bad)


def test_built_in_queries_cover_the_eight_categories() -> None:
    queries = default_text_queries(CHEXPERT_8X200_CATEGORIES)
    assert Counter(q.category for q in queries) == {c: 4 for c in CHEXPERT_8X200_CATEGORIES}
    assert set(DEFAULT_TEXT_QUERIES) == set(CHEXPERT_8X200_CATEGORIES)
    with pytest.raises(ProtocolError) as info:
        default_text_queries(["Lung Lesion"])
    assert info.value.code == "category_absent"


def _corpus() -> list[LabelledImage]:
    images = []
    for c, name in enumerate(("Edema", "Fracture", "No Finding")):
        for i in range(8):
            images.append(
                LabelledImage(f"{name}/{i}.png", {name: 1.0, "Support Devices": 1.0}, f"r{c}{i}")
            )
    # Two positives among the categories, or only uncertain: never eligible.
    images.append(LabelledImage("both.png", {"Edema": 1.0, "Fracture": 1.0}, "both"))
    images.append(LabelledImage("uncertain.png", {"Edema": -1.0}, "uncertain"))
    return images


def test_sample_protocol_is_seeded_disjoint_and_follows_the_label_rule() -> None:
    categories = ("Edema", "Fracture", "No Finding")
    queries = default_text_queries(categories)
    protocol = sample_protocol(
        _corpus(),
        categories,
        candidates_per_category=5,
        queries_per_category=2,
        seed=7,
        text_queries=queries,
    )
    assert protocol.name == "manifest"
    assert len(protocol.image_candidates) == 15
    assert len(protocol.image_queries) == 6
    paths = {c.path for c in protocol.image_candidates}
    assert not paths & {q.path for q in protocol.image_queries}
    assert not paths & {"both.png", "uncertain.png"}
    positive = protocol.positives(protocol.image_candidates)
    assert positive.sum(axis=0).tolist() == [5, 5, 5]
    assert positive.sum(axis=1).tolist() == [1] * 15
    validate_protocol(protocol)
    again = sample_protocol(
        _corpus(),
        categories,
        candidates_per_category=5,
        queries_per_category=2,
        seed=7,
        text_queries=queries,
    )
    assert [c.path for c in again.image_candidates] == [c.path for c in protocol.image_candidates]
    other = sample_protocol(
        _corpus(),
        categories,
        candidates_per_category=5,
        queries_per_category=2,
        seed=8,
        text_queries=queries,
    )
    assert [c.path for c in other.image_candidates] != [c.path for c in protocol.image_candidates]
    # A category's draw depends on its own eligible images and the seed only.
    alone = sample_protocol(
        _corpus(),
        ("No Finding",),
        candidates_per_category=5,
        queries_per_category=2,
        seed=7,
        text_queries=[],
    )
    assert [q.path for q in alone.image_queries] == [
        q.path for q in protocol.image_queries if q.category == "No Finding"
    ]
    assert np.array_equal(protocol.image_query_categories(), np.repeat([0, 1, 2], 2))


def test_sample_protocol_errors() -> None:
    with pytest.raises(ProtocolError) as info:
        sample_protocol(
            _corpus(),
            ("Edema", "Fracture"),
            candidates_per_category=7,
            queries_per_category=2,
            seed=0,
            text_queries=[],
        )
    assert info.value.code == "not_enough_images"
    assert "Edema: 8" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        sample_protocol(
            _corpus(),
            ("Edema",),
            candidates_per_category=2,
            queries_per_category=2,
            seed=0,
            text_queries=default_text_queries(("Fracture",)),
        )
    assert info.value.code == "category_absent"


def test_manifest_images(tmp_path: Path) -> None:
    records = [
        PairedRecord(
            image_path=tmp_path / f"{i}.png",
            report="",
            labels={"Edema": 1.0},
            patient_id=f"p{i}",
            study_id=f"s{i}",
        )
        for i in range(3)
    ]
    manifest = write_manifest(records, tmp_path / "m.csv")
    images = manifest_images(str(manifest))
    assert [Path(i.path) for i in images] == [tmp_path / f"{i}.png" for i in range(3)]
    assert images[0].labels == {"Edema": 1.0}
