"""Labelled images for the classification protocols (zero-shot and linear probe).

Two file layouts are read:

- a paired manifest (:mod:`model.data.manifest`, ``.csv`` or ``.jsonl``): image, patient,
  split and labels are taken from it, the report is ignored;
- CheXpert's own ``train.csv``/``valid.csv``/``test.csv`` as downloaded (``Path,Sex,Age,
  Frontal/Lateral,AP/PA`` and the 14 observation columns). Its paths start at the folder
  that holds ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``): when the CSV lies inside
  that folder, images are found next to it; ``root`` overrides. The patient is the
  ``patientNNNNN`` part of the path. Its records carry no split.

A label is used as CheXpert defines it: 1 positive, 0 negative, −1 uncertain. A blank
(not mentioned) counts as negative, the usual reading of CheXpert's labeller; an
uncertain label leaves the image out of that finding's scores.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Final

import numpy as np
import numpy.typing as npt

from model.data.manifest import ManifestError, parse_label_value, read_manifest
from model.evaluation.errors import ProtocolError
from model.labels import CHEXPERT_LABELS, POSITIVE, UNCERTAIN

#: The CheXpert competition findings whose mean AUROC is the headline figure.
COMPETITION_FINDINGS: Final[tuple[str, ...]] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)
CHEXPERT_PATH_COLUMN: Final = "Path"
_PATIENT: Final = re.compile(r"(patient\d+)")


@dataclass(frozen=True)
class LabelledRecord:
    """One image of a labelled corpus (absolute ``path``); ``where`` names its source row."""

    path: str
    labels: dict[str, float | None]
    patient_id: str
    split: str | None
    where: str


def _is_chexpert_layout(path: Path) -> bool:
    if path.suffix.lower() != ".csv":
        return False
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            header = next(csv.reader(handle), [])
    except OSError as exc:
        raise ProtocolError(
            f"{path}: cannot read: {exc.strerror or exc}", code="protocol_file_missing"
        ) from None
    return CHEXPERT_PATH_COLUMN in header and "image" not in header


def _chexpert_root(csv_path: Path, first: str | None) -> Path:
    """Where CheXpert's relative paths start, for a CSV that lies inside the download."""
    folder = csv_path.resolve().parent
    if first is not None and PurePosixPath(first).parts[:1] == (folder.name,):
        return folder.parent
    return folder


def _read_chexpert(path: Path, root: Path | None) -> list[LabelledRecord]:
    with path.open("r", encoding="utf-8-sig", newline="") as handle:
        rows = list(csv.DictReader(handle))
    base = root if root is not None else _chexpert_root(path, rows[0].get("Path") if rows else None)
    records = []
    for line, row in enumerate(rows, 2):
        where = f"{path} line {line}"
        relative = (row.get(CHEXPERT_PATH_COLUMN) or "").strip()
        if not relative:
            raise ProtocolError(f"{where}: empty Path", code="protocol_file_invalid")
        labels: dict[str, float | None] = {}
        for name in CHEXPERT_LABELS:
            try:
                labels[name] = parse_label_value(row.get(name))
            except ValueError as exc:
                raise ProtocolError(
                    f"{where}: {name}: {exc}", code="protocol_file_invalid"
                ) from None
        match = _PATIENT.search(relative)
        records.append(
            LabelledRecord(
                path=str(base / relative),
                labels=labels,
                patient_id=match.group(1) if match else relative,
                split=None,
                where=where,
            )
        )
    return records


def read_labelled(
    path: str | os.PathLike[str], *, root: str | os.PathLike[str] | None = None
) -> list[LabelledRecord]:
    """The labelled images of a manifest or a CheXpert CSV (see the module docstring)."""
    source = Path(path)
    if not source.is_file():
        raise ProtocolError(f"{source}: no such file", code="protocol_file_missing")
    if _is_chexpert_layout(source):
        records = _read_chexpert(source, Path(root) if root is not None else None)
    else:
        try:
            paired = read_manifest(source)
        except ManifestError as exc:
            raise ProtocolError(str(exc), code="protocol_file_invalid") from None
        records = [
            LabelledRecord(
                path=str(record.image_path),
                labels=dict(record.labels),
                patient_id=record.patient_id,
                split=record.split,
                where=f"{source} record {number}",
            )
            for number, record in enumerate(paired, 1)
        ]
    if not records:
        raise ProtocolError(f"{source}: no images", code="not_enough_images")
    return records


def label_matrix(
    records: Sequence[LabelledRecord], findings: Sequence[str]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """(positive, known): bool (N, C) each; ``known`` is False where the label is uncertain."""
    positive = np.zeros((len(records), len(findings)), dtype=bool)
    known = np.ones((len(records), len(findings)), dtype=bool)
    for i, record in enumerate(records):
        for c, name in enumerate(findings):
            value = record.labels.get(name)
            positive[i, c] = value == POSITIVE
            known[i, c] = value != UNCERTAIN
    return positive, known


def labelled_findings(records: Sequence[LabelledRecord], wanted: Sequence[str]) -> list[str]:
    """The names of ``wanted`` that hold at least one positive and one negative label."""
    positive, known = label_matrix(records, wanted)
    negative = known & ~positive
    return [name for c, name in enumerate(wanted) if positive[:, c].any() and negative[:, c].any()]


def _patient_bucket(patient_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2.0**64


def assign_splits(
    records: Sequence[LabelledRecord], *, seed: int = 0, validate: float = 0.1, test: float = 0.2
) -> list[LabelledRecord]:
    """Records without a split get one by patient (a hash of the seed and patient id).

    All images of a patient land in the same split, so no patient is both trained and
    tested on; records that carry a split keep it.
    """
    out = []
    for record in records:
        if record.split is not None:
            out.append(record)
            continue
        bucket = _patient_bucket(record.patient_id, seed)
        split = "test" if bucket < test else "validate" if bucket < test + validate else "train"
        out.append(replace(record, split=split))
    return out
