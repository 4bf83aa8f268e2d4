"""The retrieval protocol an evaluation scores, assembled one way for every caller.

``convirt evaluate`` and the service's evaluation runs both call :func:`assemble_protocol`:

- ``chexpert-8x200``: the official CheXpert 8x200 files, read from ``protocol_dir`` or
  found under ``root``, whose image paths are relative to ``root``;
- any other name: labelled images (read from a ``manifest``, or handed over as
  ``images``, e.g. the images a service stores) sampled per category with ``seed``.
  Categories default to the eight CheXpert 8x200 ones and text queries to the project's
  built-in queries for the chosen categories.

Either way the protocol is validated against the images under ``root`` before it is
returned, so a missing image, an absent category or too few images fail in a second,
before a bundle loads or an embedding is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from model.evaluation.errors import EvaluationError
from model.evaluation.protocol import (
    RetrievalProtocol,
    TextQuery,
    find_protocol_dir,
    read_chexpert_8x200,
    validate_protocol,
)
from model.evaluation.queries import default_text_queries
from model.evaluation.sampling import LabelledImage, manifest_images, sample_protocol
from model.labels import CHEXPERT_8X200_CATEGORIES

#: The official protocol's name; every other name is a protocol sampled from labels.
OFFICIAL: str = "chexpert-8x200"


def assemble_protocol(
    name: str,
    *,
    root: Path | None = None,
    protocol_dir: Path | None = None,
    manifest: Path | None = None,
    images: Sequence[LabelledImage] | None = None,
    categories: Sequence[str] | None = None,
    text_queries: Sequence[TextQuery] | None = None,
    candidates_per_category: int = 200,
    queries_per_category: int = 10,
    seed: int = 0,
    params: Mapping[str, object] | None = None,
    check: Callable[[RetrievalProtocol], None] | None = None,
) -> RetrievalProtocol:
    """The validated protocol ``name``; image paths in it are relative to ``root``.

    ``root`` is required for ``chexpert-8x200``; for a sampled protocol it is where
    relative image paths start (``None``: as written, absolute or from the working
    directory). A sampled protocol needs ``manifest`` or ``images``; ``params`` adds to
    what its report says about it. ``check`` sees the protocol before any image is
    opened (a caller's own rules on the paths it names).

    Raises:
        EvaluationError: the arguments do not describe a protocol (``evaluation_error``).
        ProtocolError: the files or images cannot be evaluated as they are
            (``protocol_file_missing``, ``image_missing``, ``category_absent``,
            ``not_enough_images``…).
    """
    if name == OFFICIAL:
        if root is None:
            raise EvaluationError(f"{OFFICIAL} needs the CheXpert root its paths start at")
        protocol = read_chexpert_8x200(protocol_dir or find_protocol_dir(root))
    else:
        if manifest is not None:
            images = manifest_images(str(manifest))
        if images is None:
            raise EvaluationError(f"protocol {name!r} needs a manifest or labelled images")
        chosen = list(categories) if categories else list(CHEXPERT_8X200_CATEGORIES)
        protocol = sample_protocol(
            images,
            chosen,
            candidates_per_category=candidates_per_category,
            queries_per_category=queries_per_category,
            seed=seed,
            text_queries=list(text_queries) if text_queries else default_text_queries(chosen),
            name=name,
            params=params,
        )
    if check is not None:
        check(protocol)
    validate_protocol(protocol, root)
    return protocol
