"""Retrieval protocols: which candidate images, which queries, which categories.

A :class:`RetrievalProtocol` holds two tasks over labelled candidate images:

- image → image: each query image ranks ``image_candidates``;
- text → image: each text query ranks ``text_candidates``.

A hit is a candidate whose label for the query's category is 1 (see
:mod:`model.evaluation.metrics`).

The official CheXpert 8x200 files (released by the ConVIRT authors; users download them
with CheXpert) are read from the folder that holds them, never copied::

    image-retrieval/candidate.csv   Path,Sex,Age,Frontal/Lateral,AP/PA,<14 CheXpert labels>
    image-retrieval/query.csv       Variable,Path      (category, image path)
    text-retrieval/candidate.csv    same columns as image-retrieval/candidate.csv
    text-retrieval/query.csv        Variable,Text      (category, query sentence)

Paths are relative to a CheXpert root (``CheXpert-v1.0-small/train/...``).
:func:`validate_protocol` checks what evaluation relies on and names the file and the row
(the CSV line, header = line 1) of the first offence.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from model.data.manifest import parse_label_value
from model.evaluation.errors import ProtocolError
from model.labels import CHEXPERT_8X200_CATEGORIES, POSITIVE

logger = logging.getLogger(__name__)

CHEXPERT_8X200: Final = "chexpert-8x200"
IMAGE_DIR: Final = "image-retrieval"
TEXT_DIR: Final = "text-retrieval"
CANDIDATE_FILE: Final = "candidate.csv"
QUERY_FILE: Final = "query.csv"
#: Folders below ``--root`` searched for the protocol files when none is given.
PROTOCOL_DIR_CANDIDATES: Final[tuple[str, ...]] = (
    ".",
    "chexpert-8x200",
    "protocols/chexpert-8x200",
)
#: How many offending rows a validation error lists before summarising.
MAX_LISTED: Final = 5


@dataclass(frozen=True)
class ProtocolImage:
    """A labelled candidate image.

    ``path`` is as written in the protocol: relative to the image root, or absolute.
    ``labels`` maps observation names to 1.0, 0.0, -1.0 or None (unknown). ``where`` names
    the source row for error messages (``".../candidate.csv line 3"``).
    """

    path: str
    labels: Mapping[str, float | None]
    where: str


@dataclass(frozen=True)
class ImageQuery:
    category: str
    path: str
    where: str


@dataclass(frozen=True)
class TextQuery:
    category: str
    text: str
    where: str


@dataclass(frozen=True, eq=False)
class RetrievalProtocol:
    """Both retrieval tasks of one protocol; ``params`` describes it in the report."""

    name: str
    categories: tuple[str, ...]
    image_candidates: tuple[ProtocolImage, ...]
    image_queries: tuple[ImageQuery, ...]
    text_candidates: tuple[ProtocolImage, ...]
    text_queries: tuple[TextQuery, ...]
    params: dict[str, Any] = field(default_factory=dict)

    def category_index(self, category: str) -> int:
        return self.categories.index(category)

    def positives(self, candidates: Sequence[ProtocolImage]) -> npt.NDArray[np.bool_]:
        """bool (N, C): candidate n's label for category c is 1."""
        return np.array(
            [[c.labels.get(name) == POSITIVE for name in self.categories] for c in candidates],
            dtype=bool,
        ).reshape(len(candidates), len(self.categories))

    def image_query_categories(self) -> npt.NDArray[np.int64]:
        """int (Q_image,): category index of each image query."""
        return np.array([self.category_index(q.category) for q in self.image_queries], np.int64)

    def text_query_categories(self) -> npt.NDArray[np.int64]:
        """int (Q_text,): category index of each text query."""
        return np.array([self.category_index(q.category) for q in self.text_queries], np.int64)

    def image_paths(self) -> list[str]:
        """Every distinct image path the protocol needs (candidates, then queries)."""
        seen: dict[str, None] = {}
        for item in self.images():
            seen.setdefault(item.path, None)
        return list(seen)

    def images(self) -> list[ProtocolImage | ImageQuery]:
        """Candidates of both tasks, then the query images, with repeats."""
        items: list[ProtocolImage | ImageQuery] = [*self.image_candidates, *self.text_candidates]
        items.extend(self.image_queries)
        return items

    def counts(self) -> dict[str, Any]:
        """Sizes per task and category, as the report shows them."""

        def per_category(positive: npt.NDArray[np.bool_]) -> dict[str, int]:
            return {name: int(positive[:, c].sum()) for c, name in enumerate(self.categories)}

        def queries(items: Sequence[ImageQuery] | Sequence[TextQuery]) -> dict[str, int]:
            return {name: sum(q.category == name for q in items) for name in self.categories}

        return {
            "image_candidates": len(self.image_candidates),
            "image_candidates_positive": per_category(self.positives(self.image_candidates)),
            "image_queries": len(self.image_queries),
            "image_queries_per_category": queries(self.image_queries),
            "text_candidates": len(self.text_candidates),
            "text_candidates_positive": per_category(self.positives(self.text_candidates)),
            "text_queries": len(self.text_queries),
            "text_queries_per_category": queries(self.text_queries),
        }


# --------------------------------------------------------------------------- reading


def find_protocol_dir(root: str | os.PathLike[str]) -> Path:
    """The folder under ``root`` that holds ``image-retrieval/`` and ``text-retrieval/``."""
    base = Path(root)
    for relative in PROTOCOL_DIR_CANDIDATES:
        candidate = (base / relative).resolve()
        if (candidate / IMAGE_DIR / CANDIDATE_FILE).is_file():
            return candidate
    looked = ", ".join(str(base / r / IMAGE_DIR / CANDIDATE_FILE) for r in PROTOCOL_DIR_CANDIDATES)
    raise ProtocolError(
        f"no CheXpert 8x200 protocol files under {base} (looked for {looked}); "
        "pass the folder that holds image-retrieval/ and text-retrieval/",
        code="protocol_file_missing",
    )


def read_chexpert_8x200(protocol_dir: str | os.PathLike[str]) -> RetrievalProtocol:
    """Read the official protocol files from ``protocol_dir`` (structure checks only).

    Categories are those of ``image-retrieval/query.csv`` in order of first appearance
    (then any only the text queries use). Call :func:`validate_protocol` before scoring.
    """
    base = Path(protocol_dir)
    image_candidates = _read_candidates(base / IMAGE_DIR / CANDIDATE_FILE)
    image_queries = [
        ImageQuery(category=cat, path=value, where=where)
        for cat, value, where in _read_queries(base / IMAGE_DIR / QUERY_FILE, "Path")
    ]
    text_candidates = _read_candidates(base / TEXT_DIR / CANDIDATE_FILE)
    text_queries = [
        TextQuery(category=cat, text=value, where=where)
        for cat, value, where in _read_queries(base / TEXT_DIR / QUERY_FILE, "Text")
    ]
    categories: dict[str, None] = {}
    for category in [q.category for q in image_queries] + [q.category for q in text_queries]:
        categories.setdefault(category, None)
    protocol = RetrievalProtocol(
        name=CHEXPERT_8X200,
        categories=tuple(categories),
        image_candidates=tuple(image_candidates),
        image_queries=tuple(image_queries),
        text_candidates=tuple(text_candidates),
        text_queries=tuple(text_queries),
        params={"protocol_dir": str(base.resolve())},
    )
    if protocol.categories != CHEXPERT_8X200_CATEGORIES or len(image_candidates) != 1600:
        # Allowed (a user may evaluate a variant), but the figures are then not the paper's.
        logger.warning(
            "%s: %d candidates over categories %s differ from the official 8 × 200",
            base,
            len(image_candidates),
            ", ".join(protocol.categories),
        )
    return protocol


def read_text_queries(path: str | os.PathLike[str]) -> list[TextQuery]:
    """Text queries from a CSV with a category and a text column.

    The header is ``Variable,Text`` (the official file) or ``category,text``.
    """
    file = Path(path)
    header = _csv_header(file)
    lowered = {name.lower(): name for name in header}
    if "variable" in lowered and "text" in lowered:
        category_column, text_column = lowered["variable"], lowered["text"]
    elif "category" in lowered and "text" in lowered:
        category_column, text_column = lowered["category"], lowered["text"]
    else:
        raise ProtocolError(
            f"{file} line 1: expected columns Variable,Text or category,text; got "
            f"{', '.join(header)}",
            code="protocol_file_invalid",
        )
    return [
        TextQuery(category=row[category_column].strip(), text=row[text_column].strip(), where=w)
        for row, w in _rows(file, (category_column, text_column))
    ]


def _csv_header(file: Path) -> list[str]:
    if not file.is_file():
        raise ProtocolError(f"{file}: no such protocol file", code="protocol_file_missing")
    with file.open("r", encoding="utf-8-sig", newline="") as handle:
        header = next(csv.reader(handle), [])
    if not header:
        raise ProtocolError(f"{file} line 1: empty file", code="protocol_file_invalid")
    return [name.strip() for name in header]


def _rows(file: Path, required: Sequence[str]) -> Iterator[tuple[dict[str, str], str]]:
    """Data rows of a CSV with the ``"<file> line <n>"`` each starts on; blank rows skipped."""
    with file.open("r", encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        line_end = reader.line_num
        for row in reader:
            where = f"{file} line {line_end + 1}"
            line_end = reader.line_num
            if None in row:
                raise ProtocolError(
                    f"{where}: more fields than the header has columns",
                    code="protocol_file_invalid",
                )
            if all(not (value or "").strip() for value in row.values()):
                continue
            for name in required:
                if not (row.get(name) or "").strip():
                    raise ProtocolError(f"{where}: empty {name!r}", code="protocol_file_invalid")
            yield row, where


def _read_candidates(file: Path) -> list[ProtocolImage]:
    header = _csv_header(file)
    if "Path" not in header:
        raise ProtocolError(
            f"{file} line 1: no 'Path' column (header: {', '.join(header)})",
            code="protocol_file_invalid",
        )
    label_columns = [name for name in header if name not in _CHEXPERT_META_COLUMNS]
    out: list[ProtocolImage] = []
    for row, where in _rows(file, ("Path",)):
        labels: dict[str, float | None] = {}
        for name in label_columns:
            try:
                labels[name] = parse_label_value(row.get(name))
            except ValueError as exc:
                raise ProtocolError(
                    f"{where}: column {name!r}: {exc}", code="protocol_file_invalid"
                ) from None
        out.append(ProtocolImage(path=row["Path"].strip(), labels=labels, where=where))
    logger.debug("read %d candidates from %s", len(out), file)
    return out


def _read_queries(file: Path, value_column: str) -> list[tuple[str, str, str]]:
    header = _csv_header(file)
    missing = [name for name in ("Variable", value_column) if name not in header]
    if missing:
        raise ProtocolError(
            f"{file} line 1: missing column(s) {', '.join(missing)} (header: {', '.join(header)})",
            code="protocol_file_invalid",
        )
    return [
        (row["Variable"].strip(), row[value_column].strip(), where)
        for row, where in _rows(file, ("Variable", value_column))
    ]


#: Columns of CheXpert's CSVs that are not observations.
_CHEXPERT_META_COLUMNS: Final = frozenset({"Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"})


# --------------------------------------------------------------------------- validation


def _path_key(path: str) -> str:
    """Comparable form of a protocol path: forward slashes, no ``./``."""
    return str(PurePosixPath(path.replace("\\", "/")))


def resolve_image(root: Path | None, path: str) -> Path:
    """Where an image of the protocol lives: ``root / path`` unless ``path`` is absolute."""
    candidate = Path(path)
    if candidate.is_absolute() or root is None:
        return candidate
    return root / candidate


def validate_protocol(
    protocol: RetrievalProtocol, root: str | os.PathLike[str] | None = None
) -> None:
    """Check the protocol; raise :class:`ProtocolError` naming the file and row at fault.

    Rules: at least one category, candidate and query per task; no candidate listed twice
    in a task; every query's category is a label of the candidates with at least one
    positive candidate; no query image among the candidates (same path); and, when
    ``root`` is given, every image file exists under it.
    """
    if not protocol.categories:
        raise ProtocolError(f"{protocol.name}: no categories", code="protocol_file_invalid")
    tasks: list[tuple[str, Sequence[ProtocolImage], Sequence[ImageQuery] | Sequence[TextQuery]]]
    tasks = [
        ("image", protocol.image_candidates, protocol.image_queries),
        ("text", protocol.text_candidates, protocol.text_queries),
    ]
    for task, candidates, queries in tasks:
        if not candidates:
            raise ProtocolError(
                f"{protocol.name}: the {task} task has no candidates", code="protocol_file_invalid"
            )
        if not queries:
            raise ProtocolError(
                f"{protocol.name}: the {task} task has no queries", code="protocol_file_invalid"
            )
        _check_duplicates(candidates)
        _check_categories(protocol, candidates, queries)
    _check_disjoint(protocol.image_candidates, protocol.image_queries)
    if root is not None:
        _check_files(protocol, Path(root))


def _check_duplicates(candidates: Sequence[ProtocolImage]) -> None:
    first: dict[str, str] = {}
    for candidate in candidates:
        key = _path_key(candidate.path)
        if key in first:
            raise ProtocolError(
                f"{candidate.where}: candidate {candidate.path} is already listed at {first[key]}",
                code="duplicate_candidate",
            )
        first[key] = candidate.where


def _check_categories(
    protocol: RetrievalProtocol,
    candidates: Sequence[ProtocolImage],
    queries: Sequence[ImageQuery] | Sequence[TextQuery],
) -> None:
    positive = protocol.positives(candidates)  # (N, C)
    source = candidates[0].where.rsplit(" line ", 1)[0]
    labelled = set().union(*(c.labels.keys() for c in candidates))
    for query in queries:
        if query.category not in labelled:
            raise ProtocolError(
                f"{query.where}: category {query.category!r} is not a label of the "
                f"candidates ({source})",
                code="category_absent",
            )
        if not positive[:, protocol.category_index(query.category)].any():
            raise ProtocolError(
                f"{query.where}: no candidate in {source} is positive for category "
                f"{query.category!r}",
                code="category_absent",
            )


def _check_disjoint(candidates: Sequence[ProtocolImage], queries: Sequence[ImageQuery]) -> None:
    where_candidate = {_path_key(c.path): c.where for c in candidates}
    for query in queries:
        hit = where_candidate.get(_path_key(query.path))
        if hit is not None:
            raise ProtocolError(
                f"{query.where}: query image {query.path} is also a candidate ({hit}); "
                "queries must be disjoint from the candidates",
                code="query_in_candidates",
            )


def _check_files(protocol: RetrievalProtocol, root: Path) -> None:
    missing: list[str] = []
    total = 0
    seen: set[str] = set()
    for item in protocol.images():
        if item.path in seen:
            continue
        seen.add(item.path)
        if not resolve_image(root, item.path).is_file():
            total += 1
            if len(missing) < MAX_LISTED:
                missing.append(f"{resolve_image(root, item.path)} ({item.where})")
    if total:
        more = f" and {total - len(missing)} more" if total > len(missing) else ""
        raise ProtocolError(
            f"{total} image(s) missing under {root}: {'; '.join(missing)}{more}",
            code="image_missing",
        )


def labelled_positive(labels: Mapping[str, float | None], categories: Sequence[str]) -> list[str]:
    """The categories whose label is 1 in ``labels``, in ``categories`` order."""
    return [name for name in categories if labels.get(name) == POSITIVE]
