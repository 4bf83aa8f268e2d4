"""Dataset adapters on small trees in each source's real layout, the patient split, the Dataset."""

from __future__ import annotations

import csv
import gzip
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.data.datasets import (
    PatientLeakError,
    iu_mesh_labels,
    iu_xray_records,
    manifest_records,
    mimic_cxr_records,
    split_by_patient,
)
from model.data.manifest import ManifestError, PairedRecord, write_manifest
from model.errors import ModelError
from model.labels import CHEXPERT_LABELS


def _image(path: Path, value: int = 128, size: tuple[int, int] = (24, 20)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full(size[::-1], value, np.uint8)
    pixels[: size[1] // 2] = 255 - value  # a little structure, so decoding is checkable
    Image.fromarray(pixels, mode="L").save(path)
    return path


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


# --------------------------------------------------------------------------- MIMIC-CXR

# The column orders of the real MIMIC-CXR-JPG 2.0.0 tables.
MIMIC_METADATA_HEADER = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]
MIMIC_CHEXPERT_HEADER = ["subject_id", "study_id", *sorted(CHEXPERT_LABELS)]

# (dicom_id, subject, study, view, on disk)
MIMIC_IMAGES = [
    ("02aa804e-bde0afdd-112c0b34-7bc16630-4e384014", "10000032", "50414267", "PA", True),
    ("174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962", "10000032", "50414267", "LATERAL", True),
    ("2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab", "10000032", "53189527", "AP", True),
    ("68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714", "10000764", "57375967", "AP", True),
    ("096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4", "10000898", "50771383", "PA", False),
    ("8959e402-2175d68d-edba5a6c-520f0cb1-bf2d9a72", "10001122", "51300001", "PA", True),
]
MIMIC_REPORT = """\
                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  The
 cardiomediastinal silhouette is normal.

 IMPRESSION:

 No acute cardiopulmonary process.
"""


def _mimic_tree(root: Path, reports: Path, *, gz: bool = True) -> None:
    suffix = ".csv.gz" if gz else ".csv"
    metadata, splits = [], []
    for dicom_id, subject, study, view, on_disk in MIMIC_IMAGES:
        metadata.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, "3056", "2544"])
        metadata[-1] += [
            "21800506",
            "213014.531",
            "CHEST (PA AND LAT)",
            "postero-anterior",
            "Erect",
        ]
        splits.append([dicom_id, study, subject, "test" if subject == "10000764" else "train"])
        if on_disk:
            _image(
                root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom_id}.jpg"
            )
    _write_csv(root / f"mimic-cxr-2.0.0-metadata{suffix}", MIMIC_METADATA_HEADER, metadata)
    _write_csv(
        root / f"mimic-cxr-2.0.0-split{suffix}",
        ["dicom_id", "study_id", "subject_id", "split"],
        splits,
    )
    values = {"Cardiomegaly": "1.0", "Edema": "-1.0", "No Finding": "", "Pleural Effusion": "0.0"}
    chexpert = [
        ["10000032", "50414267", *[values.get(name, "") for name in sorted(CHEXPERT_LABELS)]],
        ["10000764", "57375967", *["" for _ in CHEXPERT_LABELS]],
    ]
    _write_csv(root / f"mimic-cxr-2.0.0-chexpert{suffix}", MIMIC_CHEXPERT_HEADER, chexpert)
    # Study 53189527 has no report: it must be skipped, not fail.
    for subject, study in (
        ("10000032", "50414267"),
        ("10000764", "57375967"),
        ("10001122", "51300001"),
    ):
        path = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(MIMIC_REPORT.replace("___F", f"___F ({study})"), encoding="utf-8")


def test_mimic_frontal_records_with_reports_labels_and_splits(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root, reports = tmp_path / "mimic-cxr-jpg" / "2.0.0", tmp_path / "mimic-cxr" / "2.0.0"
    _mimic_tree(root, reports)
    with caplog.at_level(logging.WARNING, logger="model.data.datasets"):
        records = mimic_cxr_records(root, reports)

    assert [r.image_path.stem for r in records] == [
        MIMIC_IMAGES[0][0],
        MIMIC_IMAGES[3][0],
        MIMIC_IMAGES[5][0],
    ]
    first = records[0]
    assert first.image_path == (
        root / "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
    )
    assert (first.patient_id, first.study_id, first.view_position) == ("10000032", "50414267", "PA")
    assert first.split == "train"
    assert records[1].split == "test"
    assert "(50414267)" in first.report
    assert first.report.startswith(" " * 10)  # the report file as written, headers and all
    assert first.labels["Cardiomegaly"] == 1.0
    assert first.labels["Edema"] == -1.0
    assert first.labels["Pleural Effusion"] == 0.0
    assert first.labels["No Finding"] is None
    assert set(first.labels) == set(CHEXPERT_LABELS)
    assert all(v is None for v in records[1].labels.values())
    assert records[2].labels == {}  # a study absent from the CheXpert table
    assert "1 studies skipped: no report file" in caplog.text
    assert "1 images skipped: image not on disk" in caplog.text


def test_mimic_all_views_plain_csv_and_reports_beside_images(tmp_path: Path) -> None:
    _mimic_tree(tmp_path, tmp_path, gz=False)
    records = mimic_cxr_records(tmp_path, frontal_only=False)
    assert [r.view_position for r in records] == ["PA", "LATERAL", "AP", "PA"]
    # Both views of one study share its report.
    assert records[0].report == records[1].report


def test_mimic_without_the_optional_tables(tmp_path: Path) -> None:
    _mimic_tree(tmp_path, tmp_path)
    (tmp_path / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    (tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    records = mimic_cxr_records(tmp_path)
    assert len(records) == 3
    assert all(r.split is None and r.labels == {} for r in records)


def test_mimic_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"mimic-cxr-2\.0\.0-metadata\.csv"):
        mimic_cxr_records(tmp_path)
    _write_csv(tmp_path / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id"], [["a", "1"]])
    with pytest.raises(ManifestError, match=r"line 1: missing column\(s\) study_id, ViewPosition"):
        mimic_cxr_records(tmp_path)

    _mimic_tree(tmp_path / "bad", tmp_path / "bad")
    rows = [[d, st, su, "training"] for d, su, st, *_ in MIMIC_IMAGES]
    _write_csv(
        tmp_path / "bad" / "mimic-cxr-2.0.0-split.csv.gz",
        ["dicom_id", "study_id", "subject_id", "split"],
        rows,
    )
    with pytest.raises(ManifestError, match=r"split\.csv\.gz: line 2: split must be one of"):
        mimic_cxr_records(tmp_path / "bad")


# --------------------------------------------------------------------------- IU X-ray


@pytest.fixture(scope="module")
def iu_tree(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five real reports and tiny images named after their parentImage ids."""
    root = tmp_path_factory.mktemp("iu")
    archive = shared_dir / "data" / "iu-xray-reports" / "NLMCXR_reports.tgz"
    with tarfile.open(archive) as tar:
        for number in (1, 16, 227, 369, 1000):
            member = tar.getmember(f"ecgen-radiology/{number}.xml")
            (root / "ecgen-radiology").mkdir(exist_ok=True)
            (root / "ecgen-radiology" / f"{number}.xml").write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    images = root / "images"
    _image(images / "CXR1_1_IM-0001-3001.png")
    _image(images / "CXR1_1_IM-0001-4001.png")
    _image(images / "CXR16_IM-0389-1001.png")  # its report has neither findings nor impression
    _image(images / "CXR227_IM-0859-1001.png")
    _image(images / "nested" / "CXR227_IM-0859-4004.dcm.png")  # a re-distribution's naming
    # CXR227_IM-0859-12012 is not on disk; 369.xml names no image at all.
    for name in ("CXR1000_IM-0003-1001", "CXR1000_IM-0003-2001", "CXR1000_IM-0003-3001"):
        _image(images / f"{name}.png")
    (images / "notes.txt").write_text("not an image")
    return root


def test_iu_records_one_per_image_on_disk(iu_tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="model.data.datasets"):
        records = iu_xray_records(iu_tree)
    assert [r.image_path.name for r in records] == [
        "CXR1_1_IM-0001-3001.png",
        "CXR1_1_IM-0001-4001.png",
        "CXR227_IM-0859-1001.png",
        "CXR227_IM-0859-4004.dcm.png",
        "CXR1000_IM-0003-1001.png",
        "CXR1000_IM-0003-2001.png",
        "CXR1000_IM-0003-3001.png",
    ]
    assert [r.patient_id for r in records] == ["CXR1"] * 2 + ["CXR227"] * 2 + ["CXR1000"] * 3
    assert all(r.study_id == r.patient_id and r.split is None for r in records)
    assert records[0].labels == {"No Finding": 1.0}
    assert records[2].labels == {
        "Cardiomegaly": 1.0,
        "Lung Opacity": 1.0,
        "Edema": 1.0,
        "Pleural Effusion": 1.0,
    }
    assert records[0].report.startswith(
        "INDICATION: Positive TB test\nCOMPARISON: None.\nFINDINGS: "
    )
    assert "1 images skipped: report without findings or impression" in caplog.text
    assert "1 images skipped: image not on disk" in caplog.text


def test_iu_records_round_trip_through_a_manifest(iu_tree: Path, tmp_path: Path) -> None:
    records = iu_xray_records(iu_tree)
    assert manifest_records(write_manifest(records, tmp_path / "iu.jsonl")) == records


def test_iu_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="ecgen-radiology"):
        iu_xray_records(tmp_path)
    (tmp_path / "ecgen-radiology").mkdir()
    with pytest.raises(ManifestError, match="images"):
        iu_xray_records(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "ecgen-radiology" / "7.xml").write_text("<eCitation><uId id='CXR7'/>")
    with pytest.raises(ManifestError, match=r"7\.xml: not well-formed"):
        iu_xray_records(tmp_path)


@pytest.mark.parametrize(
    ("mesh", "labels"),
    [
        (["normal"], {"No Finding": 1.0}),
        (
            ["Cardiomegaly/mild", "Pleural Effusion/bilateral/small"],
            {"Cardiomegaly": 1.0, "Pleural Effusion": 1.0},
        ),
        (["Fractures, Bone/ribs/left/healed"], {"Fracture": 1.0}),
        (
            ["Pulmonary Atelectasis/base/left", "Pulmonary Edema/interstitial"],
            {"Atelectasis": 1.0, "Edema": 1.0},
        ),
        (["Opacity/lung/base/left", "Opacity/ribs"], {"Lung Opacity": 1.0}),
        (
            ["Catheters, Indwelling/right", "Nodule/lung/upper lobe"],
            {"Support Devices": 1.0, "Lung Lesion": 1.0},
        ),
        (
            ["Pneumothorax/apex/right", "Pneumonia/lower lobe/right"],
            {"Pneumothorax": 1.0, "Pneumonia": 1.0},
        ),
        (["Calcified Granuloma/lung", "No Indexing", "Thoracic Vertebrae/degenerative"], {}),
    ],
)
def test_iu_mesh_labels(mesh: list[str], labels: dict[str, float]) -> None:
    assert iu_mesh_labels(mesh) == labels
    assert set(labels) <= set(CHEXPERT_LABELS)


def _patients(n: int, per_patient: int = 3, split: str | None = None) -> list[PairedRecord]:
    return [
        PairedRecord(Path(f"/data/p{p}_{i}.png"), "r", {}, f"p{p}", f"s{p}_{i}", split)
        for p in range(n)
        for i in range(per_patient)
    ]


def _patients_of(records: list[PairedRecord]) -> set[str]:
    return {r.patient_id for r in records}


def test_split_by_patient_keeps_patients_whole_in_the_requested_shares() -> None:
    records = _patients(3000, per_patient=2)
    random.Random(0).shuffle(records)
    parts = split_by_patient(records, seed=0)
    assert list(parts) == ["train", "validate", "test"]
    assert sum(len(p) for p in parts.values()) == len(records)
    seen = [_patients_of(p) for p in parts.values()]
    assert not seen[0] & seen[1]
    assert not seen[0] & seen[2]
    assert not seen[1] & seen[2]
    shares = {name: len(_patients_of(p)) / 3000 for name, p in parts.items()}
    # Binomial noise for 3000 patients is about 0.5 to 0.7 percentage points.
    assert shares["train"] == pytest.approx(0.8, abs=0.025)
    assert shares["validate"] == pytest.approx(0.1, abs=0.02)
    assert shares["test"] == pytest.approx(0.1, abs=0.02)
    # Each list keeps the input order.
    order = {id(r): i for i, r in enumerate(records)}
    assert all([order[id(r)] for r in p] == sorted(order[id(r)] for r in p) for p in parts.values())


def test_split_by_patient_is_seeded_and_stable_when_patients_are_added() -> None:
    records = _patients(400)
    first = split_by_patient(records, {"train": 0.7, "validate": 0.3}, seed=5)
    assert first == split_by_patient(records, [("train", 0.7), ("validate", 0.3)], seed=5)
    assert first != split_by_patient(records, {"train": 0.7, "validate": 0.3}, seed=6)

    grown = split_by_patient(_patients(800), {"train": 0.7, "validate": 0.3}, seed=5)
    for name in first:
        assert _patients_of(first[name]) <= _patients_of(grown[name])


def test_split_by_patient_honours_complete_explicit_splits() -> None:
    records = [
        *_patients(5, split="train"),
        PairedRecord(Path("/v.png"), "r", {}, "pv", "sv", "validate"),
        PairedRecord(Path("/t.png"), "r", {}, "pt", "st", "test"),
    ]
    parts = split_by_patient(records)
    assert [len(parts[name]) for name in ("train", "validate", "test")] == [15, 1, 1]

    # Two of the three splits requested: the records' own test split is kept beside them.
    parts = split_by_patient(records, {"train": 0.9, "validate": 0.1})
    assert _patients_of(parts["test"]) == {"pt"}


def test_split_by_patient_refuses_a_patient_in_two_explicit_splits() -> None:
    records = [
        *_patients(3, split="train"),
        PairedRecord(Path("/x.png"), "r", {}, "p1", "s9", "test"),
        PairedRecord(Path("/v.png"), "r", {}, "pv", "sv", "validate"),
    ]
    with pytest.raises(PatientLeakError, match="'p1'") as info:
        split_by_patient(records)
    assert info.value.code == "patient_leak"
    assert isinstance(info.value, ModelError)


def test_split_by_patient_reassigns_incomplete_explicit_splits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every record says train (e.g. the test split was filtered out): a validation split
    # is still wanted, so patients are split by hash.
    records = _patients(200, split="train")
    with caplog.at_level(logging.WARNING, logger="model.data.datasets"):
        parts = split_by_patient(records, {"train": 0.8, "validate": 0.2})
    assert parts["validate"]
    assert "reassigning by patient" in caplog.text
    # Some records without a split: the explicit ones are not trusted either.
    mixed = [*_patients(50, split="test"), PairedRecord(Path("/n.png"), "r", {}, "pn", "sn")]
    parts = split_by_patient(mixed, {"train": 0.5, "test": 0.5})
    assert 0 < len(parts["train"]) < len(mixed)


@pytest.mark.parametrize(
    "fractions",
    [{}, {"train": -0.1, "test": 1.1}, {"train": 0.0}, {"train": 0.8, "holdout": 0.2}],
)
def test_split_by_patient_rejects_bad_fractions(fractions: dict[str, float]) -> None:
    with pytest.raises(ManifestError):
        split_by_patient(_patients(3), fractions)


def test_split_by_patient_needs_patient_ids() -> None:
    records = [PairedRecord(Path("/a.png"), "r", {}, "", "s")]
    with pytest.raises(ManifestError, match="patient_id"):
        split_by_patient(records)


def test_split_with_zero_share_and_no_records() -> None:
    parts = split_by_patient(_patients(300), {"train": 0.9, "validate": 0.1, "test": 0.0})
    assert parts["test"] == []
    assert split_by_patient([]) == {"train": [], "validate": [], "test": []}


# --------------------------------------------------------------------------- Dataset
