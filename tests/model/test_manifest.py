"""The paired manifest: round trips, the CheXpert-column export shape, and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.data.manifest import ManifestError, PairedRecord, read_manifest, write_manifest
from model.errors import ModelError
from model.labels import CHEXPERT_LABELS


def _records(root: Path) -> list[PairedRecord]:
    return [
        PairedRecord(
            image_path=root / "images" / "p1" / "s1.png",
            report='FINDINGS: Heart size is normal.\nIMPRESSION: No "acute" process, 5.2 cm.',
            labels={"Cardiomegaly": 0.0, "Pleural Effusion": -1.0, "Edema": None, "Fracture": 1.0},
            patient_id="p1",
            study_id="s1",
            split="train",
            view_position="PA",
        ),
        PairedRecord(
            image_path=root / "images" / "p2" / "s2.dcm",
            report="Ünïcode report, commas, and\r\nCRLF lines.",
            labels={},
            patient_id="p2",
            study_id="s2",
            split=None,
            view_position=None,
        ),
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_round_trip_keeps_every_field(tmp_path: Path, suffix: str) -> None:
    records = _records(tmp_path)
    written = write_manifest(records, tmp_path / f"manifest{suffix}")
    assert read_manifest(written) == records


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_paths_are_stored_relative_so_the_folder_can_move(tmp_path: Path, suffix: str) -> None:
    root = tmp_path / "corpus"
    records = _records(root)
    write_manifest(records, root / f"m{suffix}")
    text = (root / f"m{suffix}").read_text(encoding="utf-8")
    assert "images/p1/s1.png" in text
    assert str(tmp_path) not in text

    moved = tmp_path / "elsewhere"
    root.rename(moved)
    back = read_manifest(moved / f"m{suffix}")
    assert [r.image_path for r in back] == [moved / "images/p1/s1.png", moved / "images/p2/s2.dcm"]
    assert all(r.image_path.is_absolute() for r in back)


def test_images_outside_the_folder_and_relative_record_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    record = PairedRecord(Path("imgs/a.png"), "r", {}, "p", "s")
    write_manifest([record], tmp_path / "sub" / "m.csv")
    assert "../imgs/a.png" in (tmp_path / "sub" / "m.csv").read_text()
    assert read_manifest(tmp_path / "sub" / "m.csv")[0].image_path == tmp_path / "imgs" / "a.png"


def test_write_replaces_an_existing_manifest_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    write_manifest(_records(tmp_path), path)
    write_manifest(_records(tmp_path)[:1], path)
    assert len(read_manifest(path)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_csv_with_chexpert_label_columns(tmp_path: Path) -> None:
    header = ["image", "report", "patient_id", "Sex", *CHEXPERT_LABELS]
    values = {name: "" for name in CHEXPERT_LABELS}
    values.update({"Cardiomegaly": "1.0", "Pleural Effusion": "-1.0", "No Finding": "0.0"})
    row = ["x/a.jpg", "Enlarged heart.", "patient00001", "Female"]
    row += [values[name] for name in CHEXPERT_LABELS]
    (tmp_path / "m.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n")

    (record,) = read_manifest(tmp_path / "m.csv")
    assert record.labels["Cardiomegaly"] == 1.0
    assert record.labels["Pleural Effusion"] == -1.0
    assert record.labels["No Finding"] == 0.0
    assert record.labels["Edema"] is None
    assert set(record.labels) == set(CHEXPERT_LABELS)
    assert record.study_id == "a"  # defaults to the image stem
    assert record.split is None


def test_csv_with_a_byte_order_mark_and_padded_header(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes(
        "\ufeffimage, report ,patient_id,split\na.png,r,7,Validate\n".encode()
    )
    (record,) = read_manifest(tmp_path / "m.csv")
    assert record.patient_id == "7"
    assert record.split == "validate"


def test_jsonl_accepts_numeric_ids_and_integer_labels_and_skips_blank_lines(
    tmp_path: Path,
) -> None:
    line = {"image": "a.png", "report": "r", "patient_id": 10000032, "study_id": 50414267}
    line["labels"] = {"Edema": 1, "Atelectasis": -1, "Pneumonia": None}
    (tmp_path / "m.jsonl").write_text("\n" + json.dumps(line) + "\n\n")
    (record,) = read_manifest(tmp_path / "m.jsonl")
    assert (record.patient_id, record.study_id) == ("10000032", "50414267")
    assert record.labels == {"Edema": 1.0, "Atelectasis": -1.0, "Pneumonia": None}


def test_unknown_label_names_are_kept_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    line = {"image": "a.png", "report": "r", "patient_id": "p", "labels": {"Nodule": 1}}
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    with caplog.at_level("WARNING", logger="model.data.manifest"):
        (record,) = read_manifest(tmp_path / "m.jsonl")
    assert record.labels == {"Nodule": 1.0}
    assert "Nodule" in caplog.text


_HEADER = "image,report,patient_id,study_id,split,view_position,labels\n"


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("image,report\na.png,r\n", 1, "patient_id"),
        (_HEADER + "a.png,r,p,s,train,PA,{}\n,r,p,s,train,PA,{}\n", 3, "empty 'image'"),
        (_HEADER + "a.png,r,,s,train,PA,{}\n", 2, "patient_id"),
        (_HEADER + 'a.png,r,p,s,train,PA,"{""Edema"": 1.0"\n', 2, "not valid JSON"),
        (_HEADER + 'a.png,r,p,s,train,PA,"[1, 0]"\n', 2, "JSON object"),
        (_HEADER + 'a.png,r,p,s,train,PA,"{""Edema"": 2}"\n', 2, "'Edema'"),
        (_HEADER + 'a.png,r,p,s,train,PA,"{""Edema"": true}"\n', 2, "'Edema'"),
        (_HEADER + "a.png,r,p,s,training,PA,{}\n", 2, "split"),
        (_HEADER + 'a.png,"two\nlines",p,s,train,PA,{}\nb.png,r,p,s,dev,PA,{}\n', 4, "split"),
        (_HEADER + "a.png,r,p,s,train,PA,{},extra\n", 2, "more fields"),
        ("image,report,patient_id,Edema\na.png,r,p,yes\n", 2, "'Edema'"),
        ("image,report,patient_id,Edema\na.png,r,p,0.5\n", 2, "'Edema'"),
        ("image,report,patient_id,labels,Edema\na.png,r,p,{},1\n", 1, "both"),
        ("", 1, "header"),
    ],
)
def test_csv_errors_name_the_file_and_line(
    tmp_path: Path, body: str, line: int, needle: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert str(path) in message
    assert f"line {line}:" in message
    assert needle in message
    assert info.value.code == "invalid_manifest"
    assert isinstance(info.value, ModelError)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"image": "a.png", "patient_id": "p"}', "report"),
        ('{"image": "a.png", "report": null, "patient_id": "p"}', "report"),
        ('{"image": "", "report": "r", "patient_id": "p"}', "empty 'image'"),
        ('{"image": "a.png", "report": "r", "patient_id": ["p"]}', "patient_id"),
        ('{"image": "a.png", "report": "r", "patient_id": "p", "labels": "{}"}', "JSON object"),
        ('{"image": "a.png", "report": "r", "patient_id": "p", "split": "val"}', "split"),
        ('{"image": "a.png", "report": "r", "patient_id": "p", "labels": {"X": 0.3}}', "'X'"),
    ],
)
def test_jsonl_errors_name_the_file_and_line(tmp_path: Path, line: str, needle: str) -> None:
    good = '{"image": "ok.png", "report": "r", "patient_id": "p"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    assert f"{path}: line 3:" in str(info.value)
    assert needle in str(info.value)


def test_unsupported_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"\.csv or \.jsonl"):
        read_manifest(tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "missing.csv")
    with pytest.raises(ManifestError, match=r"\.csv or \.jsonl"):
        write_manifest([], tmp_path / "m.txt")


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"patient_id": ""}, "patient_id"),
        ({"split": "holdout"}, "split"),
        ({"labels": {"Edema": 0.5}}, "label value"),
    ],
)
def test_write_refuses_records_it_could_not_read_back(
    tmp_path: Path, change: dict[str, object], needle: str
) -> None:
    fields: dict[str, object] = {
        "image_path": tmp_path / "a.png",
        "report": "r",
        "labels": {},
        "patient_id": "p",
        "study_id": "s",
    }
    fields.update(change)
    record = PairedRecord(**fields)  # type: ignore[arg-type]
    with pytest.raises(ManifestError, match=needle):
        write_manifest([record], tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()
