"""The trainer end to end on synthetic pairs: fitting, stop conditions, metrics, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main as cli_main
from model.bundle import EncoderBundle, export_bundle
from model.checkpoint import load_checkpoint
from model.config import InvalidConfigError
from model.data.manifest import read_manifest
from model.inputs.decode import decode_file
from model.training.config import dump_train_config, load_train_config
from model.training.plots import read_metrics
from model.training.trainer import Trainer, train
from tests.model.trainer_support import (
    NO_AUGMENT,
    tiny_config,
    unique_sentence_manifest,
)

# --------------------------------------------------------------------------- training runs


@pytest.mark.slow
def test_training_lowers_the_loss_and_exports_a_working_bundle(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest = unique_sentence_manifest(corpus, tmp_path / "pairs", n_train=16, n_val=8)
    config = tiny_config(
        manifest,
        tmp_path / "run",
        towers,
        *NO_AUGMENT,
        "optim.lr=3e-3",
        "train.epochs=10",
        "train.early_stopping_patience=0",
        "model.text.freeze_layers=0",
        "model.text.freeze_embeddings=false",
    )
    result = train(config)
    assert result.stop_reason == "completed"
    assert result.epoch == 10
    assert result.step == 20  # 16 pairs / batch 8 = 2 steps per epoch
    assert len(result.train_losses) == 10
    assert result.train_losses[-1] < result.train_losses[0] - 0.2
    assert result.initial_val_loss is not None
    assert len(result.val_losses) == 10

    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 0
    assert load_train_config(run / "config.yaml") == config
    records = read_metrics(run / "metrics.jsonl")
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all(r["pairs_per_s"] > 0 and r["lr"] > 0 for r in steps)
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(11))  # 0: the untrained baseline
    assert records[-1] == {"event": "stop", "reason": "completed", "step": 20, "epoch": 10}

    assert result.best_checkpoint is not None
    best = load_checkpoint(result.best_checkpoint)
    assert best["val_loss"] == pytest.approx(result.best_val_loss)
    bundle = EncoderBundle.load(export_bundle(result.last_checkpoint, tmp_path / "bundle"))
    images = [decode_file(r.image_path).pixels for r in read_manifest(manifest)[:5]]
    image_vectors = bundle.encode_images(images)
    text_vectors = bundle.encode_texts(["Study s000001 of patient p00000."])
    assert image_vectors.shape == (5, 512)
    assert text_vectors.shape == (1, 512)
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(bundle.encode_images(images), image_vectors)


@pytest.mark.slow
def test_the_shipped_cpu_config_trains_and_exports(corpus: Path, tmp_path: Path) -> None:
    """The real default towers (pretrained EfficientNet-Lite0 + MiniLM), two small steps."""
    config = load_train_config(
        "cpu-small",
        [
            f"data.source={corpus}",
            "model.image.input_size=64",
            "data.batch_size=8",
            "data.limit=16",
            "data.num_workers=0",
            "train.max_steps=2",
            "train.progress=false",
            f"train.out_dir={tmp_path / 'run'}",
        ],
    )
    result = train(config)
    assert result.stop_reason == "max_steps"
    assert result.step == 2
    bundle = EncoderBundle.load(export_bundle(result.last_checkpoint, tmp_path / "bundle"))
    assert bundle.config["towers"]["image"] == "efficientnet_lite0"
    images = [decode_file(r.image_path).pixels for r in read_manifest(corpus)[:3]]
    vectors = bundle.encode_images(images)
    texts = bundle.encode_texts(["Small left pleural effusion.", "Normal chest."])
    assert vectors.shape == (3, 512)
    assert texts.shape == (2, 512)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)


def test_the_cpu_trains_channels_last_to_the_same_loss(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    # NHWC is the faster layout for CPU convolutions too (see CHANNELS_LAST_DEVICES);
    # the layout must change the speed only, not what is learned.
    losses = {}
    for layout in (True, False):
        option = f"train.channels_last={str(layout).lower()}"
        trainer = Trainer(tiny_config(corpus, tmp_path / str(layout), towers, option))
        try:
            assert trainer.channels_last is layout
            spatial = [
                m.weight
                for m in trainer.module.modules()
                if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
            ]
            assert spatial
            assert all(
                w.is_contiguous(memory_format=torch.channels_last) is layout for w in spatial
            )
            images, texts = next(trainer.batches(0))
            losses[layout] = float(trainer.compute_loss(images, texts).detach())
        finally:
            trainer.close()
    assert losses[True] == pytest.approx(losses[False], abs=1e-4)


@pytest.mark.slow
def test_max_steps_and_time_budget_stop_with_a_checkpoint(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    limited = tiny_config(corpus, tmp_path / "steps", towers, "train.max_steps=3")
    result = train(limited)
    assert (result.stop_reason, result.step, result.epoch) == ("max_steps", 3, 0)
    assert load_checkpoint(result.last_checkpoint)["progress"]["step"] == 3
    budget = tiny_config(corpus, tmp_path / "budget", towers, "train.time_budget_s=1e-6")
    result = train(budget)
    assert (result.stop_reason, result.step) == ("time_budget", 1)


def test_a_fresh_run_refuses_to_overwrite_an_existing_one(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    config = tiny_config(corpus, tmp_path / "run", towers, "train.max_steps=1")
    train(config)
    with pytest.raises(InvalidConfigError, match="already holds a run"):
        train(config)


@pytest.mark.slow
def test_early_stopping_and_plateau_schedule(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    # A learning rate too small to move the validation loss by min_delta: no improvement.
    config = tiny_config(
        corpus,
        tmp_path / "run",
        towers,
        "data.limit=16",
        "optim.lr=1e-9",
        "optim.warmup_steps=0",
        "optim.schedule=plateau",
        "optim.plateau_patience=1",
        "optim.plateau_factor=0.5",
        "train.epochs=6",
        "train.early_stopping_patience=2",
        "train.early_stopping_min_delta=0.01",
    )
    result = train(config)
    assert result.stop_reason == "early_stopping"
    assert result.epoch == 3  # best at epoch 1, then two epochs without improvement
    epochs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "epoch"]
    assert [r["best"] for r in epochs] == [False, True, False, False]
    # The plateau schedule halves the rate after each validation that does not beat the
    # best by its threshold (1e-4; BatchNorm statistics still move the loss a little).
    best, expected = None, 1e-9
    for record in epochs[1:]:
        if best is None or record["val_loss"] < best - 1e-4:
            best = record["val_loss"]
        else:
            expected *= 0.5
        assert record["lr"] == pytest.approx(expected)
    assert epochs[-1]["lr"] < 1e-9


@pytest.mark.slow
def test_cli_train_then_export(corpus: Path, towers: tuple[Path, Path], tmp_path: Path) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(dump_train_config(tiny_config(corpus, tmp_path / "unused", towers)))
    run = tmp_path / "run"
    status = cli_main(
        [
            "train",
            "--config",
            str(config_path),
            "--data",
            str(corpus),
            "--out",
            str(run),
            "--max-steps",
            "2",
            "--no-progress",
            "data.batch_size=4",
        ]
    )
    assert status == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["progress"]["step"] == 2
    assert cli_main(["export", str(run), "--out", str(tmp_path / "bundle")]) == 0
    bundle = EncoderBundle.load(tmp_path / "bundle")
    assert bundle.encode_texts(["Cardiomegaly."]).shape == (1, 512)
    assert cli_main(["train", "--config", str(config_path), "optim.lr=-1"]) == 1


def test_checkpoints_rebuild_their_own_model(
    corpus: Path, towers: tuple[Path, Path], tmp_path: Path
) -> None:
    from model.checkpoint import checkpoint_run_name, model_from_checkpoint

    config = tiny_config(corpus, tmp_path / "run", towers, "train.max_steps=1")
    result = train(config)
    checkpoint = load_checkpoint(result.last_checkpoint)
    model, model_config = model_from_checkpoint(checkpoint)
    assert model_config == config.model
    assert checkpoint_run_name(checkpoint) == config.name
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, checkpoint["model"][name])
