"""Typed errors of the index package.

Every error carries a stable machine-readable ``code`` (snake_case) that the service maps
to an ``application/problem+json`` response; the message is for humans. The classes say
who has to act:

- :class:`InvalidInputError` — the caller passed bad vectors, ids, ``k`` or search
  parameters (codes ``bad_dtype``, ``bad_shape``, ``dim_mismatch``, ``non_finite``,
  ``not_normalized``, ``bad_id``, ``duplicate_id``, ``k_out_of_range``,
  ``bad_search_param``).
- :class:`IndexConfigError` — the factory string cannot be used (``bad_factory``,
  ``unsupported_factory``, ``bad_dim``).
- :class:`IndexStateError` — the operation does not fit the index's state
  (``not_trained``, ``already_trained``, ``too_few_training_vectors``, ``train_failed``,
  ``id_pending_removal``, ``faiss_error``).
- :class:`IndexFileError` — a saved index cannot be trusted and must be rebuilt from the
  database: :class:`IndexCorruptError` (``manifest_missing``, ``manifest_invalid``,
  ``file_missing``, ``checksum_mismatch``, ``content_mismatch``) and
  :class:`IndexMismatchError` (``model_mismatch``, ``dim_mismatch``); saving raises
  ``save_failed``.

The base class is named ``VectorIndexError`` so that it never shadows the builtin
``IndexError``.
"""

from __future__ import annotations


class VectorIndexError(Exception):
    """Base class of every error raised on purpose by :mod:`index`."""

    code: str = "vector_index_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidInputError(VectorIndexError):
    """Vectors, ids, ``k`` or search parameters that the index refuses."""

    code = "invalid_input"


class IndexConfigError(VectorIndexError):
    """A factory string or dimension the index cannot be built from."""

    code = "bad_factory"


class IndexStateError(VectorIndexError):
    """An operation that does not fit the index's current state (e.g. adding before training)."""

    code = "bad_state"


class IndexFileError(VectorIndexError):
    """A saved index that cannot be loaded as is; the caller rebuilds it from the database."""

    code = "index_file_error"


class IndexCorruptError(IndexFileError):
    """A missing, torn or altered file, or a manifest that does not describe the data."""

    code = "checksum_mismatch"


class IndexMismatchError(IndexFileError):
    """A sound index built for another model or dimension than the caller expects."""

    code = "model_mismatch"
