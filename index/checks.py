"""Validation of what callers hand the index: unit vectors, ids and positive integers.

Every check raises :class:`~index.errors.InvalidInputError` with a stable code, so the
service can answer a 4xx instead of letting FAISS fail (or silently accept) bad input.
"""

from __future__ import annotations

from typing import NoReturn

import numpy as np
import numpy.typing as npt

from index.errors import InvalidInputError

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]

#: Largest ``k`` a search accepts.
MAX_K = 4096
#: Largest allowed ``|‖x‖² − 1|`` for a vector to count as L2-normalised.
NORM_TOLERANCE = 1e-3
_ID_MAX = np.iinfo(np.int64).max


def l2_normalize(vectors: npt.ArrayLike) -> FloatArray:
    """Return ``vectors`` (N, D) as float32 rows of unit L2 norm; zero rows stay zero."""
    x = np.asarray(vectors, dtype=np.float32)  # (N, D)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)  # (N, 1)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)  # (N, D)


def check_vectors(vectors: npt.ArrayLike, dim: int, what: str) -> FloatArray:
    """Validate (N, dim) unit vectors and return them as C-contiguous float32.

    This runs on every search, so the common case costs a handful of NumPy calls; the
    diagnosis of what is wrong runs only on failure.
    """
    arr = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
    if arr.dtype.kind != "f":
        raise InvalidInputError(
            f"{what} must be floating point, got dtype {arr.dtype}", code="bad_dtype"
        )
    if arr.ndim != 2:
        raise InvalidInputError(
            f"{what} must be a 2-D array (N, {dim}), got shape {arr.shape}", code="bad_shape"
        )
    if arr.shape[1] != dim:
        raise InvalidInputError(
            f"{what} have dimension {arr.shape[1]}, the index has {dim}", code="dim_mismatch"
        )
    x = arr
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        x = np.ascontiguousarray(x, dtype=np.float32)  # (N, dim)
    # NaN or ±inf makes a squared norm non-finite and every comparison below false, so the
    # norm test covers finiteness too.
    if x.shape[0] == 1:
        # np.dot on two 1-D rows skips the ufunc machinery: ~0.5 µs against ~5-10 µs for
        # einsum or a reduction, which matters on the single-query path.
        row_sq = float(np.dot(x[0], x[0]))
        ok = abs(row_sq - 1.0) <= NORM_TOLERANCE
    elif x.shape[0] == 0:
        ok = True
    else:
        sq = np.einsum("ij,ij->i", x, x)  # (N,)
        ok = bool(sq.min() >= 1.0 - NORM_TOLERANCE) and bool(sq.max() <= 1.0 + NORM_TOLERANCE)
    if not ok:
        _raise_vector_error(x, what)
    return x


def _raise_vector_error(x: FloatArray, what: str) -> NoReturn:
    finite = np.isfinite(x).all(axis=1)  # (N,)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise InvalidInputError(f"{what} row {row} has NaN or inf", code="non_finite")
    norms = np.linalg.norm(x.astype(np.float64), axis=1)  # (N,)
    row = int(np.argmax(np.abs(norms**2 - 1.0)))
    raise InvalidInputError(
        f"{what} row {row} has L2 norm {float(norms[row]):.6f}, expected 1 "
        "(the index stores L2-normalised vectors; see index.l2_normalize)",
        code="not_normalized",
    )


def check_ids(ids: npt.ArrayLike) -> IdArray:
    """Validate a 1-D array of non-negative integer ids and return it as int64."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise InvalidInputError(f"ids must be 1-D, got shape {arr.shape}", code="bad_shape")
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise InvalidInputError(f"ids must be integers, got dtype {arr.dtype}", code="bad_dtype")
    if arr.dtype.kind == "u" and int(arr.max()) > _ID_MAX:
        raise InvalidInputError("ids must fit in int64", code="bad_id")
    out = arr.astype(np.int64, copy=False)
    if int(out.min()) < 0:
        # -1 pads missing results, so negative ids would be ambiguous.
        raise InvalidInputError("ids must be non-negative", code="bad_id")
    return out


def check_positive_int(value: object, name: str, code: str, upper: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise InvalidInputError(f"{name} must be an integer, got {value!r}", code=code)
    number = int(value)
    if number < 1 or (upper is not None and number > upper):
        bound = f"1..{upper}" if upper is not None else ">= 1"
        raise InvalidInputError(f"{name} must be in {bound}, got {number}", code=code)
    return number
