"""The paired manifest: the file a hospital team exports from its archive to train on.

A manifest lists one chest radiograph per record together with its free-text report,
its patient and study, and optionally its split, view and CheXpert-style labels. Two
encodings are read, chosen by the file suffix.

CSV (``.csv``, UTF-8, a byte-order mark is tolerated) with a header row::

    image,report,patient_id,study_id,split,view_position,labels
    images/p1_s1.png,"FINDINGS: Heart size is normal. ...",p1,s1,train,PA,"{""Cardiomegaly"": 0.0}"

JSON Lines (``.jsonl``, UTF-8): one JSON object per line with the same keys; ``labels``
is an object, not a string; blank lines are skipped::

    {"image": "images/p1_s1.png", "report": "...", "patient_id": "p1", "study_id": "s1",
     "split": "train", "view_position": "PA", "labels": {"Cardiomegaly": 0.0}}

Fields:

- ``image`` (required, non-empty): path of the image file (DICOM, PNG or JPEG), relative
  to the folder that holds the manifest, or absolute. Records read back carry an
  absolute path. Forward slashes work on every platform.
- ``report`` (required): the free-text report. It may be empty for label-only sources
  (CheXpert has no reports); such records are useless for contrastive training.
- ``patient_id`` (required, non-empty): splitting by patient needs it, so that no
  patient's studies land in both the training and the test split.
- ``study_id`` (optional): defaults to the image file name without its suffix.
- ``split`` (optional): ``train``, ``validate`` or ``test`` (case-insensitive); empty
  means unassigned.
- ``view_position`` (optional): e.g. ``PA``, ``AP``, ``LATERAL``; kept as written.
- ``labels`` (optional): a JSON object from label name to value, where ``1`` is
  positive, ``0`` negative, ``-1`` uncertain and ``null`` (or an absent name) unknown.
  Names are normally the 14 CheXpert observations (:data:`model.labels.CHEXPERT_LABELS`);
  other names are kept, with a logged warning.

Instead of the ``labels`` column a CSV may carry one column per CheXpert observation,
named exactly as in CheXpert's ``train.csv`` (``No Finding``, ``Cardiomegaly``,
``Pleural Effusion``, ...), holding ``1.0``, ``0.0``, ``-1.0`` or nothing: the common
export shape. A CSV must not carry both. Other columns are ignored.

Any violation (missing required column or key, empty ``image`` or ``patient_id``,
malformed JSON, a label value outside {1, 0, -1, empty}, an unknown split) raises
:class:`ManifestError`, whose message names the file and the record's line.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from model.errors import ModelError
from model.labels import CHEXPERT_LABELS, NEGATIVE, POSITIVE, UNCERTAIN

logger = logging.getLogger(__name__)

#: Column order of a written CSV manifest; also the keys of a JSONL record.
MANIFEST_COLUMNS: Final[tuple[str, ...]] = (
    "image",
    "report",
    "patient_id",
    "study_id",
    "split",
    "view_position",
    "labels",
)
REQUIRED_COLUMNS: Final[tuple[str, ...]] = ("image", "report", "patient_id")
#: The splits a manifest may name (MIMIC-CXR's spelling).
SPLITS: Final[tuple[str, ...]] = ("train", "validate", "test")
_LABEL_VALUES: Final[frozenset[float]] = frozenset({POSITIVE, NEGATIVE, UNCERTAIN})


class ManifestError(ModelError):
    """A manifest (or a set of records) that cannot be used as it is."""

    code = "invalid_manifest"


@dataclass(frozen=True)
class PairedRecord:
    """One image with its report: the unit every dataset adapter returns.

    ``labels`` maps an observation name to 1.0 (positive), 0.0 (negative), -1.0
    (uncertain) or None (unknown); an absent name is unknown as well.
    """

    image_path: Path
    report: str
    labels: dict[str, float | None]
    patient_id: str
    study_id: str
    split: str | None = None
    view_position: str | None = None


def read_manifest(path: str | os.PathLike[str]) -> list[PairedRecord]:
    """Read a ``.csv`` or ``.jsonl`` manifest into records with absolute image paths."""
    manifest = Path(path)
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ManifestError(f"{manifest}: a manifest must end in .csv or .jsonl")
    if not manifest.is_file():
        raise ManifestError(f"{manifest}: no such manifest file")
    base = manifest.resolve().parent
    records = list(_read_csv(manifest, base) if suffix == ".csv" else _read_jsonl(manifest, base))
    _warn_unknown_labels(manifest, records)
    logger.info("read %d records from %s", len(records), manifest)
    return records


def write_manifest(records: Sequence[PairedRecord], path: str | os.PathLike[str]) -> Path:
    """Write records as a ``.csv`` or ``.jsonl`` manifest (chosen by the suffix).

    Image paths are written relative to the manifest's folder so that the folder can be
    moved as a whole; a relative ``image_path`` is taken relative to the current working
    directory. The file is replaced atomically. Returns the manifest's path.
    """
    manifest = Path(path)
    suffix = manifest.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ManifestError(f"{manifest}: a manifest must end in .csv or .jsonl")
    manifest.parent.mkdir(parents=True, exist_ok=True)
    base = manifest.resolve().parent
    rows = [_to_row(record, base, manifest, number) for number, record in enumerate(records, 1)]
    # A temporary file in the same folder, then a rename: a reader never sees half a manifest.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{manifest.name}.", suffix=".tmp", dir=base)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            if suffix == ".csv":
                writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
                writer.writeheader()
                for row in rows:
                    writer.writerow({**row, "labels": json.dumps(row["labels"])})
            else:
                for row in rows:
                    # JSON has null: an unassigned split or view is written as such, not "".
                    row = {**row, "split": row["split"] or None}
                    row["view_position"] = row["view_position"] or None
                    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp_name, manifest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.info("wrote %d records to %s", len(rows), manifest)
    return manifest


def parse_label_value(raw: object) -> float | None:
    """One label value from a CSV cell or a JSON value: 1, 0, -1, or None when blank.

    Raises ``ValueError`` for anything else; the readers turn it into a ManifestError.
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        # json gives True/False for true/false, and bool is an int: refuse rather than guess.
        raise ValueError(f"label value must be 1, 0, -1 or empty, got {raw!r}")
    if isinstance(raw, int | float):
        value = float(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        if not text:
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"label value must be 1, 0, -1 or empty, got {raw!r}") from None
    else:
        raise ValueError(f"label value must be 1, 0, -1 or empty, got {raw!r}")
    if math.isnan(value):
        # pandas writes a blank cell back as NaN.
        return None
    if value not in _LABEL_VALUES:
        raise ValueError(f"label value must be 1, 0, -1 or empty, got {raw!r}")
    return value


def parse_split(raw: object) -> str | None:
    """A split name (``train``/``validate``/``test``, any case) or None when blank."""
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or empty, got {raw!r}")
    text = raw.strip().lower()
    if not text:
        return None
    if text not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)} or empty, got {raw!r}")
    return text


def _read_csv(manifest: Path, base: Path) -> Iterator[PairedRecord]:
    with manifest.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        if not header:
            raise ManifestError(f"{manifest}: line 1: empty file, expected a header row")
        reader.fieldnames = header
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise ManifestError(
                f"{manifest}: line 1: missing required column(s) {', '.join(missing)}"
                f" (header: {', '.join(header)})"
            )
        label_columns = [name for name in CHEXPERT_LABELS if name in header]
        if "labels" in header and label_columns:
            raise ManifestError(
                f"{manifest}: line 1: has both a 'labels' column and CheXpert label columns"
                f" ({', '.join(label_columns)}); keep one"
            )
        line_end = reader.line_num
        for row in reader:
            # A quoted report may span lines: name the line on which the record starts.
            where = f"{manifest}: line {line_end + 1}"
            line_end = reader.line_num
            if None in row:
                raise ManifestError(f"{where}: more fields than the header has columns")
            if "labels" in header:
                labels = _labels_from_json_text(row.get("labels"), where)
            else:
                labels = _labels_from_columns(row, label_columns, where)
            yield _record(row, labels, base, where)


def _read_jsonl(manifest: Path, base: Path) -> Iterator[PairedRecord]:
    with manifest.open("r", encoding="utf-8-sig") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{manifest}: line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"{where}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            missing = [name for name in REQUIRED_COLUMNS if name not in obj]
            if missing:
                raise ManifestError(f"{where}: missing required key(s) {', '.join(missing)}")
            raw_labels = obj.get("labels")
            if raw_labels is None:
                labels: dict[str, float | None] = {}
            elif isinstance(raw_labels, dict):
                labels = _labels_from_mapping(raw_labels, where)
            else:
                raise ManifestError(f"{where}: 'labels' must be a JSON object")
            yield _record(obj, labels, base, where)


def _record(
    row: Mapping[str, Any], labels: dict[str, float | None], base: Path, where: str
) -> PairedRecord:
    image = _text_field(row, "image", where)
    if not image:
        raise ManifestError(f"{where}: empty 'image'")
    report = row.get("report")
    if not isinstance(report, str):
        raise ManifestError(f"{where}: 'report' must be a string")
    patient_id = _text_field(row, "patient_id", where)
    if not patient_id:
        raise ManifestError(f"{where}: empty 'patient_id' (splitting by patient needs it)")
    # One Path per record: building several is most of the cost of reading a large manifest.
    image_path = Path(os.path.normpath(os.path.join(base, image)))
    study_id = _text_field(row, "study_id", where) or image_path.stem
    try:
        split = parse_split(row.get("split"))
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    view_position = _text_field(row, "view_position", where) or None
    return PairedRecord(
        image_path=image_path,
        report=report,
        labels=labels,
        patient_id=patient_id,
        study_id=study_id,
        split=split,
        view_position=view_position,
    )


def _text_field(row: Mapping[str, Any], key: str, where: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    # JSONL exports often write numeric ids (MIMIC subject_id) as numbers.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise ManifestError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value.strip()


def _labels_from_json_text(text: str | None, where: str) -> dict[str, float | None]:
    if text is None or not text.strip():
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{where}: 'labels' is not valid JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: 'labels' must be a JSON object")
    return _labels_from_mapping(obj, where)


def _labels_from_mapping(obj: Mapping[str, object], where: str) -> dict[str, float | None]:
    labels: dict[str, float | None] = {}
    for name, raw in obj.items():
        if not name.strip():
            raise ManifestError(f"{where}: empty label name in 'labels'")
        try:
            labels[name.strip()] = parse_label_value(raw)
        except ValueError as exc:
            raise ManifestError(f"{where}: label {name!r}: {exc}") from None
    return labels


def _labels_from_columns(
    row: Mapping[str, str | None], columns: Sequence[str], where: str
) -> dict[str, float | None]:
    labels: dict[str, float | None] = {}
    for name in columns:
        try:
            labels[name] = parse_label_value(row.get(name))
        except ValueError as exc:
            raise ManifestError(f"{where}: column {name!r}: {exc}") from None
    return labels


def _warn_unknown_labels(manifest: Path, records: Sequence[PairedRecord]) -> None:
    known = set(CHEXPERT_LABELS)
    unknown = sorted({name for r in records for name in r.labels if name not in known})
    if unknown:
        logger.warning("%s: label names outside CheXpert's 14 kept as-is: %s", manifest, unknown)


def _to_row(record: PairedRecord, base: Path, manifest: Path, number: int) -> dict[str, Any]:
    where = f"{manifest}: record {number}"
    if not str(record.image_path):
        raise ManifestError(f"{where}: empty image_path")
    if not record.patient_id:
        raise ManifestError(f"{where}: empty patient_id")
    try:
        split = parse_split(record.split)
        labels = {name: parse_label_value(value) for name, value in record.labels.items()}
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    image = os.path.abspath(record.image_path)
    try:
        relative = os.path.relpath(image, base)
    except ValueError:
        # Another drive on Windows: no relative path exists, keep it absolute.
        relative = image
    relative = relative.replace(os.sep, "/")
    return {
        "image": relative,
        "report": record.report,
        "patient_id": record.patient_id,
        "study_id": record.study_id,
        "split": split or "",
        "view_position": record.view_position or "",
        "labels": labels,
    }
