"""The options that keep a pretrained image backbone close to its start while training.

``optim.image_backbone_lr_scale`` scales its learning rate, ``optim.image_backbone_frozen_steps``
holds it still for the first steps (LP-FT), ``optim.l2sp`` pulls it towards its initial
weights. Checked on the tiny towers: what moves, what stands still, and by how much.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from model.config import InvalidConfigError
from model.convirt import ConVIRT
from model.data.synthetic import generate_corpus
from model.training.config import load_train_config
from model.training.trainer import Trainer
from tests.model.trainer_support import make_tiny_towers, tiny_config


@pytest.fixture(autouse=True)
def _offline() -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("corpus"), 40, seed=1, size=64, progress=False)


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tiny_towers(tmp_path_factory.mktemp("towers"))


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


def _moved(before: dict[str, torch.Tensor], module: torch.nn.Module) -> float:
    after = dict(module.named_parameters())
    return sum(float((after[k].detach() - v).norm()) for k, v in before.items())


@contextmanager
def _trainer(
    corpus: Path, towers: tuple[Path, Path], out: Path, *overrides: str
) -> Iterator[tuple[Trainer, ConVIRT]]:
    """A tiny trainer without warmup (the first steps move at the full rate), and its model."""
    trainer = Trainer(tiny_config(corpus, out, towers, "optim.warmup_steps=0", *overrides))
    try:
        assert isinstance(trainer.module, ConVIRT)
        yield trainer, trainer.module
    finally:
        trainer.close()


def _steps(trainer: Trainer, n: int) -> None:
    batches = trainer.batches(0)
    for _ in range(n):
        images, texts = next(batches)
        trainer.forward_backward(images, texts)
        trainer._optimizer_step()


def test_frozen_steps_hold_the_backbone_while_the_heads_learn(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    with _trainer(
        corpus,
        towers,
        tmp_path / "run",
        "optim.image_backbone_frozen_steps=2",
        "optim.image_backbone_lr_scale=0.5",
    ) as (trainer, model):
        backbone, heads = model.image_encoder, model.image_projection
        start_backbone, start_heads = _snapshot(backbone), _snapshot(heads)
        _steps(trainer, 2)
        assert _moved(start_backbone, backbone) == 0.0
        assert _moved(start_heads, heads) > 0.0
        groups = trainer.optimizer.param_groups
        assert [g["lr"] for g in groups][1] == pytest.approx(groups[0]["lr"] * 0.5)
        _steps(trainer, 1)
        assert _moved(start_backbone, backbone) > 0.0


def test_a_zero_rate_freezes_the_backbone_without_gradients(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    with _trainer(corpus, towers, tmp_path / "run", "optim.image_backbone_lr_scale=0") as (
        trainer,
        model,
    ):
        backbone, heads = model.image_encoder, model.image_projection
        start_backbone = {k: v.detach().clone() for k, v in backbone.named_parameters()}
        start_heads = _snapshot(heads)
        _steps(trainer, 2)
        # No gradient is even computed for it, and the optimizer does not hold it.
        assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not held & {id(p) for p in backbone.parameters()}
        assert _moved(start_backbone, backbone) == 0.0
        assert _moved(start_heads, heads) > 0.0


def test_l2sp_pulls_towards_the_initial_weights(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    def distance(alpha: float, out: Path) -> float:
        torch.manual_seed(0)
        trainer = Trainer(tiny_config(corpus, out, towers, f"optim.l2sp={alpha}"))
        try:
            assert isinstance(trainer.module, ConVIRT)
            backbone = trainer.module.image_encoder
            start = _snapshot(backbone)
            if alpha > 0:
                assert trainer._l2sp is not None
                assert float(trainer._l2sp.penalty().detach()) == 0.0
            _steps(trainer, 4)
            return _moved(start, backbone)
        finally:
            trainer.close()

    free = distance(0.0, tmp_path / "free")
    held = distance(1e4, tmp_path / "held")
    assert held < free


def test_the_options_are_checked() -> None:
    for bad in (
        "optim.image_backbone_lr_scale=-1",
        "optim.image_backbone_frozen_steps=-2",
        "optim.l2sp=-0.1",
    ):
        with pytest.raises(InvalidConfigError, match=bad.split("=")[0].split(".")[1]):
            load_train_config("cpu-small", [bad])


def test_frozen_batchnorm_keeps_the_pretrained_statistics_in_training() -> None:
    from model.config import ImageTowerConfig
    from model.towers.image import build_image_tower

    def after_one_batch(freeze: bool) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
        torch.manual_seed(0)
        tower = build_image_tower(
            ImageTowerConfig(input_size=64, freeze_batchnorm=freeze), pretrained=False
        )
        start = {k: v.clone() for k, v in tower.state_dict().items() if "running" in k}
        tower.train()
        tower(torch.rand(4, 3, 64, 64) * 3.0 + 1.0)  # far from the weights' statistics
        return start, tower

    start, frozen = after_one_batch(True)
    assert frozen.training
    state = frozen.state_dict()
    assert start
    assert all(torch.equal(start[k], state[k]) for k in start)
    start, free = after_one_batch(False)
    state = free.state_dict()
    assert any(not torch.equal(start[k], state[k]) for k in start)


def test_frozen_first_blocks_stand_still_and_skip_the_backward(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    # The tiny ResNet has two blocks; the stem and the first stay, the second learns.
    with _trainer(corpus, towers, tmp_path / "run", "model.image.freeze_blocks=1") as (
        trainer,
        model,
    ):
        tower = model.image_encoder
        stem, blocks = tower.stem_and_blocks()
        frozen = [*stem, blocks[0]]
        # Batch-norm statistics count too: a frozen block stays in eval mode in training.
        start = [{k: v.clone() for k, v in m.state_dict().items()} for m in frozen]
        learning = _snapshot(blocks[1])
        _steps(trainer, 2)
        assert tower.training
        assert not any(m.training for m in frozen)
        for module, before in zip(frozen, start, strict=True):
            after = module.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in before)
            assert all(p.grad is None for p in module.parameters())
        assert _moved(learning, blocks[1]) > 0.0
        held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
        assert not held & {id(p) for m in frozen for p in m.parameters()}


def test_freeze_blocks_is_checked_against_the_tower(towers: tuple[Path, Path]) -> None:
    from model.config import ImageTowerConfig
    from model.towers.image import build_image_tower

    with pytest.raises(InvalidConfigError, match="freeze_blocks: -1 is negative"):
        ImageTowerConfig(freeze_blocks=-1)
    with pytest.raises(InvalidConfigError, match="more than the tower's 2 blocks"):
        build_image_tower(
            ImageTowerConfig(name="hf", path_or_id=str(towers[0]), input_size=64, freeze_blocks=3)
        )
    lite = build_image_tower(ImageTowerConfig(input_size=64, freeze_blocks=16), pretrained=False)
    assert len(lite.stem_and_blocks()[1]) == 16
    # Only the head convolution after the 16 blocks is left to learn.
    assert {n.split(".")[1] for n, p in lite.named_parameters() if p.requires_grad} == {
        "_conv_head",
        "_bn1",
    }
