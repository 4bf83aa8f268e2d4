"""The manifest written beside a saved index: what it holds and how to check it.

``manifest.json`` is the commit point of :meth:`index.VectorIndex.save`: it is replaced
atomically after the data files are durable, and it names them together with their
sha256, so a reader sees either the old save or the new one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from index.errors import IndexCorruptError

#: Bumped when the layout of a saved index changes incompatibly.
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
METRIC = "inner_product"


@dataclass(frozen=True)
class IndexManifest:
    """Description of a saved index.

    ``count`` is the number of live vectors (what ``ntotal`` returns); ``checksum`` is
    ``"sha256:<hex>"`` of ``index_file``; ``labels_file``/``labels_checksum`` are set only
    for kinds whose ids the wrapper keeps itself (HNSW).
    """

    model_id: str
    dim: int
    metric: str
    factory: str
    kind: str
    count: int
    checksum: str
    faiss_version: str
    created: str
    index_file: str
    labels_file: str | None = None
    labels_checksum: str | None = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> IndexManifest:
        """Parse and type-check a manifest; anything unexpected is a corrupt manifest."""
        try:
            raw = json.loads(text)
        except ValueError as exc:
            raise IndexCorruptError(
                f"manifest is not valid JSON: {exc}", code="manifest_invalid"
            ) from exc
        if not isinstance(raw, dict):
            raise IndexCorruptError("manifest is not a JSON object", code="manifest_invalid")
        expected: dict[str, tuple[type, ...]] = {
            "model_id": (str,),
            "dim": (int,),
            "metric": (str,),
            "factory": (str,),
            "kind": (str,),
            "count": (int,),
            "checksum": (str,),
            "faiss_version": (str,),
            "created": (str,),
            "index_file": (str,),
            "labels_file": (str, type(None)),
            "labels_checksum": (str, type(None)),
            "format_version": (int,),
        }
        missing = sorted(set(expected) - set(raw))
        unknown = sorted(set(raw) - set(expected))
        if missing or unknown:
            raise IndexCorruptError(
                f"manifest fields missing {missing} or unknown {unknown}", code="manifest_invalid"
            )
        fields: dict[str, Any] = {}
        for name, types in expected.items():
            value = raw[name]
            # bool is an int subclass in Python; a boolean dim or count is still corrupt.
            if isinstance(value, bool) or not isinstance(value, types):
                raise IndexCorruptError(
                    f"manifest field {name!r} has the wrong type: {value!r}",
                    code="manifest_invalid",
                )
            fields[name] = value
        manifest = cls(**fields)
        if manifest.format_version != FORMAT_VERSION:
            raise IndexCorruptError(
                f"manifest format {manifest.format_version} is not {FORMAT_VERSION}",
                code="manifest_invalid",
            )
        if manifest.metric != METRIC:
            raise IndexCorruptError(
                f"manifest metric {manifest.metric!r} is not {METRIC!r}", code="manifest_invalid"
            )
        if manifest.dim < 1 or manifest.count < 0:
            raise IndexCorruptError(
                f"manifest has dim={manifest.dim}, count={manifest.count}",
                code="manifest_invalid",
            )
        for file_name in (manifest.index_file, manifest.labels_file):
            # File names come from disk: refuse anything that could point outside the dir.
            if file_name is not None and (
                file_name != file_name.strip() or "/" in file_name or file_name.startswith(".")
            ):
                raise IndexCorruptError(
                    f"manifest names an unsafe file {file_name!r}", code="manifest_invalid"
                )
        return manifest
