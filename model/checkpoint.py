"""Training checkpoints: atomic writes, format checks and the RNG states of a run.

A checkpoint is a plain dict saved with :func:`torch.save` and read back with
``weights_only=True`` (no arbitrary pickles are executed on load). It always carries the full
training config as a dict, so a checkpoint can rebuild its own model: the ``name`` and
``model`` sections of that dict are all inference needs, so rebuilding reads them with
:class:`model.config.ModelConfig` and never touches the training package.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.errors import ModelError

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.convirt import EncoderModel

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "convirt-checkpoint"
CHECKPOINT_VERSION = 1


class CheckpointError(ModelError):
    """A checkpoint file is missing, unreadable or not a ConVIRT checkpoint."""

    code = "checkpoint_invalid"


def capture_rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch (CPU and every CUDA device) generator states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # weights_only loading refuses numpy arrays, so the key travels as a tensor.
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    python_state = state["python"]
    # torch.load gives lists back where random.getstate had tuples.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this machine has %d: not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically: a crash mid-write never leaves a torn file.

    The format marker and version are added here; returns the path written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(data, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    logger.debug("checkpoint written to %s", target)
    return target


def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` and check its format.

    Raises :class:`CheckpointError` when the file is missing, unreadable or of another format.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"checkpoint {source} does not exist")
    try:
        data = torch.load(source, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {source} could not be read: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{source} is not a ConVIRT training checkpoint")
    if data.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"checkpoint {source} has format version {data.get('version')!r}, "
            f"this code reads version {CHECKPOINT_VERSION}"
        )
    for key in ("config", "model"):
        if key not in data:
            raise CheckpointError(f"checkpoint {source} lacks its {key!r} entry")
    return data


def _stored_config(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    stored = checkpoint.get("config")
    if not isinstance(stored, Mapping):
        raise CheckpointError("the checkpoint's config entry is not a mapping")
    return stored


def checkpoint_run_name(checkpoint: Mapping[str, Any]) -> str:
    """The run's ``name`` (the exported model's name) stored in a loaded checkpoint."""
    name = _stored_config(checkpoint).get("name")
    if not isinstance(name, str) or not name:
        raise CheckpointError("the checkpoint's config has no run name")
    return name


def checkpoint_temperature(checkpoint: Mapping[str, Any]) -> float:
    """The InfoNCE temperature the run trained with (its ``loss.temperature``)."""
    from model.config import LossConfig

    loss = _stored_config(checkpoint).get("loss")
    value = loss.get("temperature") if isinstance(loss, Mapping) else None
    return float(value) if isinstance(value, int | float) else LossConfig().temperature


def checkpoint_data_source(checkpoint: Mapping[str, Any]) -> str:
    """The run's ``data.source`` (a manifest path or an adapter spec; "" when absent)."""
    data = _stored_config(checkpoint).get("data")
    source = data.get("source") if isinstance(data, Mapping) else None
    return source if isinstance(source, str) else ""


def model_from_checkpoint(checkpoint: Mapping[str, Any]) -> tuple[EncoderModel, ModelConfig]:
    """Rebuild the model stored in a loaded checkpoint (no pretrained weights are read).

    Returns the model with the checkpoint's weights and the ``model`` section of the
    stored training config; raises :class:`model.config.InvalidConfigError` when that
    section is malformed.
    """
    from model.config import ModelConfig, config_from_dict
    from model.convirt import build_encoder

    section = _stored_config(checkpoint).get("model", {})
    config = config_from_dict(ModelConfig, section)
    model = build_encoder(config, pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model, config
