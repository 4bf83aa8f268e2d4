"""Checkpoint files: format checks, atomic replacement and the RNG states of a run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def test_rng_states_survive_a_checkpoint(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    _draws()
    path = save_checkpoint(
        tmp_path / "c.pt", {"config": {}, "model": {}, "rng": capture_rng_state()}
    )
    expected = _draws()
    _draws()  # move every generator on
    restore_rng_state(load_checkpoint(path)["rng"])
    assert _draws() == expected


def test_checkpoint_round_trips_tensors_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, {"config": {"name": "a"}, "model": {"w": torch.ones(3)}})
    save_checkpoint(path, {"config": {"name": "b"}, "model": {"w": torch.zeros(3)}})
    loaded = load_checkpoint(path)
    assert loaded["config"] == {"name": "b"}
    assert torch.equal(loaded["model"]["w"], torch.zeros(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def test_foreign_or_missing_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "absent.pt")
    assert info.value.code == "checkpoint_invalid"
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a ConVIRT"):
        load_checkpoint(foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(garbage)


def test_a_checkpoint_without_a_usable_model_config_is_refused() -> None:
    from model.checkpoint import checkpoint_run_name, model_from_checkpoint
    from model.config import InvalidConfigError

    with pytest.raises(CheckpointError, match="not a mapping"):
        model_from_checkpoint({"config": "cpu-small", "model": {}})
    with pytest.raises(CheckpointError, match="no run name"):
        checkpoint_run_name({"config": {"model": {}}})
    with pytest.raises(InvalidConfigError, match=r"projection\.dim"):
        model_from_checkpoint({"config": {"model": {"projection": {"dim": "wide"}}}, "model": {}})
