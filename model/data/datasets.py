"""Paired image–report records: one adapter per source, and a patient-disjoint split.

Every source is reduced to a list of :class:`model.data.manifest.PairedRecord` by a small
adapter that reads the source's own layout:

- :func:`manifest_records` — the project's CSV/JSONL manifest (:mod:`model.data.manifest`);
- :func:`mimic_cxr_records` — MIMIC-CXR-JPG images with the MIMIC-CXR report text files;
- :func:`iu_xray_records` — IU X-ray / Open-i PNG images with their ``ecgen-radiology`` XML;

:func:`split_by_patient` splits records so that no patient is in two splits. The trainer's
torch dataset over these records is :class:`model.training.data.PairDataset`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final, TextIO

from model.data.manifest import (
    SPLITS,
    ManifestError,
    PairedRecord,
    parse_label_value,
    parse_split,
    read_manifest,
)
from model.inputs.reports import ReportError, parse_iu_report_xml
from model.labels import CHEXPERT_LABELS, POSITIVE

logger = logging.getLogger(__name__)

#: View positions kept by ``frontal_only``: posteroanterior and anteroposterior.
FRONTAL_VIEWS: Final[frozenset[str]] = frozenset({"PA", "AP"})

#: The default split: 80 % of the patients for training, 10 % each for validation and test.
DEFAULT_FRACTIONS: Final[tuple[tuple[str, float], ...]] = (
    ("train", 0.8),
    ("validate", 0.1),
    ("test", 0.1),
)


class PatientLeakError(ManifestError):
    """The records' own splits put one patient in two splits."""

    code = "patient_leak"


# --------------------------------------------------------------------------- manifest


def manifest_records(path: str | os.PathLike[str]) -> list[PairedRecord]:
    """The records of a CSV/JSONL manifest (see :mod:`model.data.manifest`)."""
    return read_manifest(path)


# --------------------------------------------------------------------------- MIMIC-CXR

_MIMIC_METADATA = "mimic-cxr-2.0.0-metadata.csv"
_MIMIC_SPLIT = "mimic-cxr-2.0.0-split.csv"
_MIMIC_CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv"


def mimic_cxr_records(
    root: str | os.PathLike[str],
    reports_root: str | os.PathLike[str] | None = None,
    *,
    frontal_only: bool = True,
) -> list[PairedRecord]:
    """Records of a MIMIC-CXR-JPG download, with reports from the MIMIC-CXR report tree.

    ``root`` holds ``mimic-cxr-2.0.0-metadata.csv[.gz]`` (``dicom_id``, ``subject_id``,
    ``study_id``, ``ViewPosition``), optionally ``mimic-cxr-2.0.0-split.csv[.gz]`` (adds
    ``split``: train/validate/test) and ``mimic-cxr-2.0.0-chexpert.csv[.gz]`` (adds the 14
    labels; blank is None, -1.0 uncertain), and the images as
    ``files/p10/p10000032/s50414267/<dicom_id>.jpg``. Reports are read from
    ``files/p10/p10000032/s50414267.txt`` under ``reports_root`` (default ``root``).

    With ``frontal_only`` only PA and AP views are kept. Images that are not on disk
    (partial downloads are common) and studies without a report file are skipped, each
    with a logged count. ``patient_id`` is the ``subject_id`` and ``study_id`` the
    ``study_id``, both as digits without their ``p``/``s`` prefix.
    """
    base = Path(root)
    text_base = Path(reports_root) if reports_root is not None else base
    metadata = _find_table(base, _MIMIC_METADATA)
    if metadata is None:
        raise ManifestError(f"{base}: neither {_MIMIC_METADATA} nor {_MIMIC_METADATA}.gz found")
    splits = _mimic_splits(_find_table(base, _MIMIC_SPLIT))
    labels = _mimic_labels(_find_table(base, _MIMIC_CHEXPERT))

    records: list[PairedRecord] = []
    reports: dict[str, str | None] = {}
    skipped: Counter[str] = Counter()
    for where, row in _rows(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        dicom_id, subject, study = row["dicom_id"], row["subject_id"], row["study_id"]
        if not (dicom_id and subject.isdigit() and study.isdigit()):
            raise ManifestError(f"{where}: dicom_id, subject_id and study_id must be set")
        view = row["ViewPosition"].strip() or None
        if frontal_only and view not in FRONTAL_VIEWS:
            skipped["not a frontal view"] += 1
            continue
        study_dir = Path("files", f"p{subject[:2]}", f"p{subject}")
        image = base / study_dir / f"s{study}" / f"{dicom_id}.jpg"
        if not image.is_file():
            skipped["image not on disk"] += 1
            continue
        if study not in reports:
            reports[study] = _read_text(text_base / study_dir / f"s{study}.txt")
        report = reports[study]
        if report is None:
            continue
        records.append(
            PairedRecord(
                image_path=image,
                report=report,
                labels=dict(labels.get((subject, study), {})),
                patient_id=subject,
                study_id=study,
                split=splits.get(dicom_id),
                view_position=view,
            )
        )
    missing_reports = sum(1 for text in reports.values() if text is None)
    if missing_reports:
        logger.warning("MIMIC-CXR: %d studies skipped: no report file", missing_reports)
    _log_skipped("MIMIC-CXR", skipped)
    logger.info("MIMIC-CXR: %d records from %s", len(records), base)
    return records


def _mimic_splits(table: Path | None) -> dict[str, str | None]:
    if table is None:
        logger.info("MIMIC-CXR: no %s: records carry no split", _MIMIC_SPLIT)
        return {}
    splits: dict[str, str | None] = {}
    for where, row in _rows(table, ("dicom_id", "split")):
        try:
            splits[row["dicom_id"]] = parse_split(row["split"])
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
    return splits


def _mimic_labels(table: Path | None) -> dict[tuple[str, str], dict[str, float | None]]:
    if table is None:
        logger.info("MIMIC-CXR: no %s: records carry no labels", _MIMIC_CHEXPERT)
        return {}
    labels: dict[tuple[str, str], dict[str, float | None]] = {}
    for where, row in _rows(table, ("subject_id", "study_id", *CHEXPERT_LABELS)):
        labels[(row["subject_id"], row["study_id"])] = _label_columns(row, where)
    return labels


# --------------------------------------------------------------------------- IU X-ray

#: MeSH major terms of the IU reports (the part before the first "/") that name a
#: CheXpert observation outright. Terms such as "Calcified Granuloma" have none.
IU_MESH_TO_CHEXPERT: Final[dict[str, str]] = {
    "normal": "No Finding",
    "Cardiomegaly": "Cardiomegaly",
    "Pleural Effusion": "Pleural Effusion",
    "Pneumothorax": "Pneumothorax",
    "Hydropneumothorax": "Pneumothorax",
    "Hemopneumothorax": "Pneumothorax",
    "Pulmonary Atelectasis": "Atelectasis",
    "Atelectasis": "Atelectasis",
    "Pulmonary Edema": "Edema",
    "Edema": "Edema",
    "Pneumonia": "Pneumonia",
    "Consolidation": "Consolidation",
    "Fractures, Bone": "Fracture",
    "Catheters, Indwelling": "Support Devices",
    "Tube, Inserted": "Support Devices",
}
#: Terms that name a CheXpert observation only with a qualifier: "Opacity/lung/base".
IU_QUALIFIED_MESH_TO_CHEXPERT: Final[dict[tuple[str, str], str]] = {
    ("Opacity", "lung"): "Lung Opacity",
    ("Airspace Disease", "lung"): "Lung Opacity",
    ("Infiltrate", "lung"): "Lung Opacity",
    ("Nodule", "lung"): "Lung Lesion",
    ("Mass", "lung"): "Lung Lesion",
    ("Thickening", "pleura"): "Pleural Other",
}


def iu_mesh_labels(mesh_major: Iterable[str]) -> dict[str, float | None]:
    """CheXpert labels from IU MeSH major terms: 1.0 for each observation named, else absent.

    MeSH majors list what the report found, never what it ruled out, so no label is 0.
    """
    labels: dict[str, float | None] = {}
    for term in mesh_major:
        parts = [part.strip() for part in term.split("/")]
        name = IU_MESH_TO_CHEXPERT.get(parts[0])
        if name is None and len(parts) > 1:
            name = IU_QUALIFIED_MESH_TO_CHEXPERT.get((parts[0], parts[1].lower()))
        if name is not None:
            labels[name] = POSITIVE
    return labels


_IMAGE_SUFFIXES: Final = (".png", ".jpg", ".jpeg", ".dcm")


def iu_xray_records(root: str | os.PathLike[str]) -> list[PairedRecord]:
    """Records of an IU X-ray / Open-i download: one per image named in a report's XML.

    ``root`` holds ``ecgen-radiology/*.xml`` and the images under ``images/``, found by
    file name (``CXR1_1_IM-0001-3001.png``; ``.dcm.png`` as in some re-distributions, and
    ``.jpg``/``.dcm`` work too), in any sub-folder. ``patient_id`` and ``study_id`` are the
    report uid (``CXR1``: IU has one study per patient); the report is the headed text of
    :attr:`model.inputs.reports.IUReport.text`; labels come from :func:`iu_mesh_labels`. Reports
    with neither findings nor impression and images not on disk are skipped with a logged
    count. IU has no split and no view position.
    """
    base = Path(root)
    xml_dir = base / "ecgen-radiology"
    if not xml_dir.is_dir():
        raise ManifestError(f"{base}: no ecgen-radiology/ folder of XML reports")
    images = _index_images(base / "images")
    records: list[PairedRecord] = []
    skipped: Counter[str] = Counter()
    for xml_path in sorted(xml_dir.glob("*.xml"), key=_natural_key):
        try:
            report = parse_iu_report_xml(xml_path)
        except ReportError as exc:
            raise ManifestError(str(exc)) from None
        if not (report.findings or report.impression):
            skipped["report without findings or impression"] += 1
            continue
        labels = iu_mesh_labels(report.mesh_major)
        for image_id in report.image_ids:
            image = images.get(image_id)
            if image is None:
                skipped["image not on disk"] += 1
                continue
            records.append(
                PairedRecord(
                    image_path=image,
                    report=report.text,
                    labels=dict(labels),
                    patient_id=report.uid,
                    study_id=report.uid,
                )
            )
    _log_skipped("IU X-ray", skipped)
    logger.info("IU X-ray: %d records from %s", len(records), base)
    return records


def _index_images(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no images folder")
    found: dict[str, Path] = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            stem = stem.removesuffix(".dcm")
            found.setdefault(stem, Path(directory, name))
    return found


def _natural_key(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (-1, path.stem)


# --------------------------------------------------------------------------- tables


def _find_table(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


@contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as raw, io.TextIOWrapper(raw, "utf-8-sig", newline="") as text:
            yield text
    else:
        with path.open("r", encoding="utf-8-sig", newline="") as text:
            yield text


def _rows(path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, row) for each row of a CSV (or .csv.gz); checks the header first."""
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        missing = [name for name in required if name not in header]
        if missing:
            raise ManifestError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
        line_end = reader.line_num
        for row in reader:
            where = f"{path}: line {line_end + 1}"
            line_end = reader.line_num
            yield where, {key: (value or "").strip() for key, value in row.items() if key}


def _label_columns(row: Mapping[str, str], where: str) -> dict[str, float | None]:
    labels: dict[str, float | None] = {}
    for name in CHEXPERT_LABELS:
        try:
            labels[name] = parse_label_value(row.get(name))
        except ValueError as exc:
            raise ManifestError(f"{where}: column {name!r}: {exc}") from None
    return labels


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None


def _log_skipped(source: str, skipped: Counter[str]) -> None:
    for reason, count in sorted(skipped.items()):
        logger.warning("%s: %d images skipped: %s", source, count, reason)


# --------------------------------------------------------------------------- splits


def split_by_patient(
    records: Sequence[PairedRecord],
    fractions: Mapping[str, float] | Sequence[tuple[str, float]] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> dict[str, list[PairedRecord]]:
    """Split records so that every patient's records land in exactly one split.

    When every record carries a ``split`` and, together, they name every split that
    ``fractions`` gives a positive share, those splits are kept as they are, after
    checking that no patient appears in two (:class:`PatientLeakError`, code
    ``patient_leak``). Otherwise each patient goes to the split whose share of [0, 1)
    holds a seeded hash of the patient id: a patient keeps its split when records are
    added or removed, and the shares match ``fractions`` (normalised to sum 1) up to
    sampling noise, which is large for a few dozen patients.

    The result has a (possibly empty) list for every name in ``fractions``, plus any
    other split the records name; each list keeps the input order.
    """
    shares = dict(fractions)
    if not shares or any(value < 0 for value in shares.values()) or sum(shares.values()) <= 0:
        raise ManifestError(f"split fractions must be non-negative with a positive sum: {shares}")
    unknown = set(shares) - set(SPLITS)
    if unknown:
        raise ManifestError(f"unknown split name(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
    for record in records:
        if not record.patient_id:
            raise ManifestError(f"{record.image_path}: empty patient_id, cannot split by patient")

    result: dict[str, list[PairedRecord]] = {name: [] for name in shares}
    named = {record.split for record in records}
    wanted = {name for name, value in shares.items() if value > 0}
    if records and None not in named and wanted <= named:
        owner: dict[str, str] = {}
        for record in records:
            split = record.split or ""  # never empty here: every record names its split
            first = owner.setdefault(record.patient_id, split)
            if first != split:
                raise PatientLeakError(
                    f"patient {record.patient_id!r} is in both the {first!r} and the "
                    f"{split!r} split (e.g. {record.image_path})"
                )
            result.setdefault(split, []).append(record)
        logger.info("kept the records' own splits: %s", _sizes(result))
        return result
    if None not in named and records:
        logger.warning(
            "records name the splits %s but not %s: reassigning by patient",
            sorted(n for n in named if n),
            sorted(wanted - named),
        )

    total = sum(shares.values())
    bounds: list[tuple[float, str]] = []
    running = 0.0
    for name, value in shares.items():
        if value > 0:
            running += value / total
            bounds.append((running, name))
    # Rounding may leave the last bound a hair under 1.
    bounds[-1] = (1.0, bounds[-1][1])
    assigned: dict[str, str] = {}
    for record in records:
        chosen = assigned.get(record.patient_id)
        if chosen is None:
            point = _unit_hash(seed, record.patient_id)
            chosen = next(n for bound, n in bounds if point < bound)
            assigned[record.patient_id] = chosen
        result[chosen].append(record)
    logger.info("split %d patients by hash (seed %d): %s", len(assigned), seed, _sizes(result))
    return result


def _unit_hash(seed: int, patient_id: str) -> float:
    """A uniform number in [0, 1) fixed by (seed, patient_id), the same on every machine."""
    digest = hashlib.sha256(f"{seed}\x00{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _sizes(parts: Mapping[str, Sequence[PairedRecord]]) -> dict[str, int]:
    return {name: len(items) for name, items in parts.items()}
