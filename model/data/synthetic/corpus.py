"""Synthetic corpora: a folder of studies with a manifest, and a CheXpert-style tree.

A corpus is reproducible from its seed: everything about patient j comes from (seed, j)
and about study i from (seed, i), so the first 100 studies of a 200-study corpus are the
100 studies of a 100-study corpus, and a re-run reuses the images already on disk.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from model.data.synthetic.anatomy import Anatomy, sample_anatomy
from model.data.synthetic.findings import FINDING_LABELS, SyntheticDataError, derived_rng
from model.data.synthetic.painting import paint
from model.data.synthetic.study import SyntheticStudy, check_size, plan_study, render_study
from model.labels import CHEXPERT_LABELS

logger = logging.getLogger(__name__)

#: Split names, as :mod:`model.data.manifest` spells them.
SPLIT_NAMES: Final[tuple[str, str, str]] = ("train", "validate", "test")
#: Bumped whenever a change alters the pixels or reports produced for a seed.
GENERATOR_VERSION: Final = 2
# The generator's name in a corpus's stamp file: the package's import path, kept as it
# was when the generator was one module, so that existing corpora stay valid.
_GENERATOR: Final = "model.data.synthetic"

MANIFEST_NAME: Final = "manifest.csv"
_STAMP_NAME: Final = "synthetic.json"
#: How many studies a patient has in a corpus, and how likely each count is.
_STUDIES_PER_PATIENT: Final[tuple[tuple[int, ...], tuple[float, ...]]] = (
    (1, 2, 3, 4),
    (0.6, 0.25, 0.1, 0.05),
)


@dataclass(frozen=True)
class _Entry:
    index: int
    patient_id: str
    study_id: str
    split: str
    anatomy: Anatomy


def _corpus_entries(n: int, seed: int, splits: Sequence[float]) -> list[_Entry]:
    """The first ``n`` studies of the corpus for ``seed``, patient by patient.

    Everything about patient j comes from (seed, j) and about study i from (seed, i), so a
    longer corpus extends a shorter one. The split is the patient's, never the study's.
    """
    bounds = np.cumsum(np.asarray(splits, dtype=np.float64))
    entries: list[_Entry] = []
    patient = 0
    while len(entries) < n:
        rng = derived_rng(seed, "patient", patient)
        count = int(rng.choice(_STUDIES_PER_PATIENT[0], p=_STUDIES_PER_PATIENT[1]))
        draw = float(rng.uniform())
        split = SPLIT_NAMES[min(int(np.searchsorted(bounds, draw, side="right")), 2)]
        anatomy = sample_anatomy(rng)
        for _ in range(count):
            if len(entries) == n:
                break
            index = len(entries)
            entries.append(_Entry(index, f"p{patient:05d}", f"s{index:06d}", split, anatomy))
        patient += 1
    return entries


def generate_corpus(
    out_dir: str | os.PathLike[str],
    n: int,
    *,
    seed: int = 0,
    size: int = 256,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    progress: bool = True,
) -> Path:
    """Write ``n`` synthetic studies as ``out_dir/images/*.png`` plus ``out_dir/manifest.csv``.

    Patients have one to four studies; ``splits`` (train, validate, test fractions) is
    applied per patient, so a patient's studies share a split. Images that already exist
    are reused rather than redrawn, which makes a re-run with the same arguments cheap; a
    folder made with another seed or size is refused (``corpus_mismatch``). Returns the
    manifest's path (format: :mod:`model.data.manifest`).
    """
    from tqdm import tqdm

    from model.data.manifest import PairedRecord, write_manifest

    check_size(size)
    if not isinstance(n, int) or n < 0:
        raise SyntheticDataError(
            f"n must be a non-negative integer, got {n!r}", code="invalid_argument"
        )
    fractions = [float(x) for x in splits]
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise SyntheticDataError(
            f"splits must be three non-negative fractions summing to 1, got {splits!r}",
            code="invalid_argument",
        )
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, seed, size)
    records: list[PairedRecord] = []
    rendered = 0
    # disable=None: a bar on a terminal, silence in logs and CI.
    with tqdm(
        total=n, disable=None if progress else True, desc="synthetic studies", unit="study"
    ) as bar:
        for entry in _corpus_entries(n, seed, fractions):
            plan = plan_study(derived_rng(seed, "study", entry.index), None, entry.anatomy, None)
            path = images / f"{entry.study_id}.png"
            if not path.exists():
                image, _ = paint(plan, size)
                # Level 1: the film grain does not compress anyway, and it is 2x faster.
                _save_atomic(Image.fromarray(image), path, format="PNG", compress_level=1)
                rendered += 1
            records.append(
                PairedRecord(
                    image_path=path.resolve(),
                    report=plan.report,
                    labels={name: value for name, value in plan.labels.items()},
                    patient_id=entry.patient_id,
                    study_id=entry.study_id,
                    split=entry.split,
                    view_position=plan.acquisition.view_position,
                )
            )
            bar.update(1)
    manifest = write_manifest(records, out / MANIFEST_NAME)
    logger.info(
        "synthetic corpus: %d studies (%d rendered, %d reused) in %s",
        n,
        rendered,
        n - rendered,
        out,
    )
    return manifest


def _claim_folder(out: Path, seed: int, size: int) -> None:
    """Record what made the folder's images, or refuse one made otherwise."""
    stamp_path = out / _STAMP_NAME
    wanted = {"generator": _GENERATOR, "version": GENERATOR_VERSION, "seed": seed, "size": size}
    if stamp_path.exists():
        try:
            found = json.loads(stamp_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SyntheticDataError(
                f"{stamp_path}: unreadable ({exc}); remove the folder or choose another",
                code="corpus_mismatch",
            ) from None
        if found != wanted:
            raise SyntheticDataError(
                f"{out} holds a synthetic corpus made with {found}, not {wanted};"
                " choose another folder or delete it",
                code="corpus_mismatch",
            )
        return
    if any((out / "images").iterdir()):
        raise SyntheticDataError(
            f"{out}/images already holds files that this generator did not record;"
            " choose another folder",
            code="corpus_mismatch",
        )
    stamp_path.write_text(json.dumps(wanted, indent=2) + "\n", encoding="utf-8")


def _save_atomic(image: Image.Image, path: Path, **params: object) -> None:
    """Save via a temporary file and a rename, so a file that exists is a whole file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, **params)  # type: ignore[arg-type]
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


_PATIENT_RE: Final = re.compile(r"patient\d+")
_STUDY_RE: Final = re.compile(r"(patient\d+)/(study\d+)")


def chexpert_study(
    path: str,
    labels: Mapping[str, float | None],
    *,
    seed: int = 0,
    size: int = 320,
    view_position: str | None = None,
) -> SyntheticStudy:
    """The synthetic study that stands in for one CheXpert image.

    Renders every finding whose label is 1.0 (uncertain -1.0 and blank are not rendered);
    a row with none renders a normal chest. The patient's anatomy is seeded by the
    ``patientNNNNN`` part of ``path`` and the study by the whole path, so every study of a
    patient shares one body and the result does not depend on the CSV's row order.
    """
    match = _PATIENT_RE.search(path)
    patient_id = match.group(0) if match else path
    study_match = _STUDY_RE.search(path)
    study_id = f"{study_match.group(1)}_{study_match.group(2)}" if study_match else path
    findings = [label for label in FINDING_LABELS if labels.get(label) == 1.0]
    return render_study(
        derived_rng(seed, "chexpert-study", path),
        findings,
        size=size,
        anatomy=sample_anatomy(derived_rng(seed, "chexpert-patient", patient_id)),
        view_position=view_position,
        patient_id=patient_id,
        study_id=study_id,
    )


@dataclass(frozen=True)
class _ChexpertRow:
    path: str
    labels: dict[str, float | None]
    view_position: str | None


def _read_chexpert_csv(csv_path: Path) -> list[_ChexpertRow]:
    """Rows of a CheXpert-format CSV: label columns (candidate.csv, train.csv) or the
    ``Variable,Path`` shape of the 8x200 image query file."""
    rows: list[_ChexpertRow] = []
    try:
        handle = csv_path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise SyntheticDataError(
            f"{csv_path}: cannot read ({exc.strerror})", code="invalid_chexpert_csv"
        ) from None
    with handle:
        reader = csv.DictReader(handle)
        header = [name.strip() for name in reader.fieldnames or []]
        reader.fieldnames = header
        label_columns = [name for name in CHEXPERT_LABELS if name in header]
        if "Path" not in header or not (label_columns or "Variable" in header):
            raise SyntheticDataError(
                f"{csv_path}: expected a 'Path' column and CheXpert label columns or a"
                f" 'Variable' column, got {header}",
                code="invalid_chexpert_csv",
            )
        for row in reader:
            where = f"{csv_path}: line {reader.line_num}"
            path = (row.get("Path") or "").strip()
            if not path:
                raise SyntheticDataError(f"{where}: empty Path", code="invalid_chexpert_csv")
            labels: dict[str, float | None] = {}
            if label_columns:
                for name in label_columns:
                    labels[name] = _label_cell(row.get(name), where, name)
            else:
                variable = (row.get("Variable") or "").strip()
                if variable not in CHEXPERT_LABELS:
                    raise SyntheticDataError(
                        f"{where}: Variable {variable!r} is not a CheXpert observation",
                        code="invalid_chexpert_csv",
                    )
                labels[variable] = 1.0
            view = (row.get("AP/PA") or "").strip() or None
            rows.append(_ChexpertRow(path, labels, view))
    return rows


def _label_cell(raw: str | None, where: str, name: str) -> float | None:
    text = (raw or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (1.0, 0.0, -1.0):
        raise SyntheticDataError(
            f"{where}: column {name!r} must be 1.0, 0.0, -1.0 or empty, got {raw!r}",
            code="invalid_chexpert_csv",
        )
    return value


def write_chexpert_tree(
    root: str | os.PathLike[str],
    csv_paths: Sequence[str | os.PathLike[str]],
    *,
    seed: int = 0,
    size: int = 320,
    progress: bool = False,
) -> int:
    """Render a JPEG at ``root/<Path>`` for every row of the given CheXpert-format CSVs.

    The image shows the findings the row labels 1.0 (see :func:`chexpert_study`), so the
    CheXpert 8x200 protocol files (``candidate.csv``, ``query.csv``) can be evaluated end
    to end against synthetic images. Files that already exist are skipped; a path listed
    twice is rendered once. Returns how many files were written.
    """
    from tqdm import tqdm

    check_size(size)
    base = Path(root).resolve()
    rows = [row for csv_path in csv_paths for row in _read_chexpert_csv(Path(csv_path))]
    written = 0
    seen: set[str] = set()
    for row in tqdm(rows, disable=None if progress else True, desc="CheXpert tree", unit="image"):
        if row.path in seen:
            continue
        seen.add(row.path)
        dest = (base / row.path).resolve()
        if base not in dest.parents:
            raise SyntheticDataError(
                f"CheXpert path {row.path!r} points outside {base}", code="invalid_chexpert_csv"
            )
        if dest.exists():
            continue
        study = chexpert_study(
            row.path, row.labels, seed=seed, size=size, view_position=row.view_position
        )
        dest.parent.mkdir(parents=True, exist_ok=True)
        _save_atomic(Image.fromarray(study.image), dest, format="JPEG", quality=92)
        written += 1
    logger.info(
        "CheXpert tree: %d images written, %d already present under %s",
        written,
        len(seen) - written,
        base,
    )
    return written
