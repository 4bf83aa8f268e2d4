"""The encoder bundle: export, verified offline loading, encoding and tamper detection."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from model.bundle import (
    BundleCorruptError,
    BundleInvalidError,
    EncoderBundle,
    export_bundle,
    read_bundle_manifest,
)
from model.checkpoint import save_checkpoint
from model.convirt import build_model
from model.data.manifest import read_manifest as read_pairs
from model.data.synthetic import generate_corpus
from model.inputs.decode import decode_file
from model.towers.heads import ProjectionHead
from model.training.config import train_config_to_dict
from tests.model.trainer_support import make_tiny_towers, tiny_config

TEXTS = [
    "Moderate left pleural effusion.",
    "The heart is enlarged.",
    "No acute cardiopulmonary process.",
    "Right apical pneumothorax.",
    "Bibasilar atelectasis.",
]


@pytest.fixture(scope="module")
def bundle_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A smaller corpus than the trainer tests' (12 studies): only its images are read."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), 12, seed=3, size=96, progress=False)


@pytest.fixture(scope="module")
def checkpoint(
    tmp_path_factory: pytest.TempPathFactory, bundle_corpus: Path, towers: tuple[Path, Path]
) -> Path:
    """A weights checkpoint of the tiny model, as the trainer writes best.pt."""
    root = tmp_path_factory.mktemp("ckpt")
    config = tiny_config(bundle_corpus, root / "run", towers)
    torch.manual_seed(0)
    model = build_model(config.model)
    return save_checkpoint(
        root / "best.pt",
        {
            "kind": "weights",
            "config": train_config_to_dict(config),
            "model": model.state_dict(),
            "progress": {"epoch": 1, "step": 3},
        },
    )


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path) -> Path:
    return export_bundle(checkpoint, tmp_path_factory.mktemp("bundles") / "tiny", name="tiny")


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path) -> EncoderBundle:
    return EncoderBundle.load(bundle_dir, device="cpu")


@pytest.fixture(scope="module")
def images(bundle_corpus: Path) -> list[np.ndarray]:
    return [decode_file(r.image_path).pixels for r in read_pairs(bundle_corpus)[:7]]


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def test_bundle_layout_and_model_id(bundle_dir: Path) -> None:
    manifest = read_bundle_manifest(bundle_dir)
    assert manifest["model_id"].startswith("sha256:")
    assert len(manifest["model_id"]) == len("sha256:") + 64
    assert manifest["dim"] == 512
    assert manifest["name"] == "tiny"
    files = manifest["files"]
    assert "model.safetensors" in files
    assert "config.json" in files
    assert any(rel.startswith("tokenizer/") for rel in files)
    config = json.loads((bundle_dir / "config.json").read_text())
    assert config["preprocessing"]["size"] == 64
    assert config["pooling"] == "max"
    assert config["model"]["projection"]["dim"] == 512


def test_export_is_deterministic(checkpoint: Path, bundle_dir: Path, tmp_path: Path) -> None:
    again = export_bundle(checkpoint, tmp_path / "again", name="tiny")
    assert read_bundle_manifest(again)["model_id"] == read_bundle_manifest(bundle_dir)["model_id"]


def test_export_refuses_a_non_empty_directory(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(BundleInvalidError):
        export_bundle(checkpoint, tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_encodings_are_unit_norm_float32_and_deterministic(
    bundle: EncoderBundle, images: list[np.ndarray]
) -> None:
    assert bundle.dim == 512
    assert bundle.model_id == read_bundle_manifest(bundle.path)["model_id"]
    image_vectors = bundle.encode_images(images, batch_size=3)
    text_vectors = bundle.encode_texts(TEXTS, batch_size=2)
    for vectors, count in ((image_vectors, len(images)), (text_vectors, len(TEXTS))):
        assert vectors.shape == (count, 512)
        assert vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(bundle.encode_images(images, batch_size=3), image_vectors)
    # Batching does not change a vector (eval mode: no batch statistics).
    np.testing.assert_allclose(bundle.encode_images(images, batch_size=1), image_vectors, atol=1e-5)
    np.testing.assert_allclose(bundle.encode_texts(TEXTS, batch_size=64), text_vectors, atol=1e-5)
    # Different inputs land on different points.
    assert not np.allclose(text_vectors[0], text_vectors[1])


def test_empty_inputs_give_empty_matrices(bundle: EncoderBundle) -> None:
    assert bundle.encode_images([]).shape == (0, 512)
    assert bundle.encode_texts([]).shape == (0, 512)


def test_bundle_embeds_like_the_checkpoint_model(
    bundle: EncoderBundle, checkpoint: Path, images: list[np.ndarray]
) -> None:
    from model.checkpoint import load_checkpoint, model_from_checkpoint

    model, _ = model_from_checkpoint(load_checkpoint(checkpoint))
    model.eval()
    with torch.inference_mode():
        expected_images = model.encode_image(model.eval_transform().stack(images)).numpy()
        expected_texts = model.encode_text(model.tokenize(TEXTS)).numpy()
    np.testing.assert_allclose(bundle.encode_images(images), expected_images, atol=1e-5)
    np.testing.assert_allclose(bundle.encode_texts(TEXTS), expected_texts, atol=1e-5)


def test_a_cpu_bundle_runs_its_convolutions_channels_last(bundle: EncoderBundle) -> None:
    # The faster layout on the CPU; the vectors stay the checkpoint model's (above).
    spatial = [
        m.weight
        for m in bundle.model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)
    ]
    assert spatial
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in spatial)


def test_export_and_load_never_import_training(
    checkpoint: Path, tmp_path: Path, images: list[np.ndarray]
) -> None:
    """The service loads bundles without the trainer's code (and its dependencies)."""
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from model.bundle import EncoderBundle, export_bundle\n"
        f"out = export_bundle({str(checkpoint)!r}, {str(tmp_path / 'b')!r})\n"
        "bundle = EncoderBundle.load(out, device='cpu')\n"
        "bundle.encode_texts(['No effusion.'])\n"
        "bundle.encode_images([np.zeros((64, 64), np.float32)])\n"
        "print(sorted(m for m in sys.modules if m.startswith('model.training')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_export_names_the_bundle_after_the_run_unless_told(
    checkpoint: Path, bundle: EncoderBundle, tmp_path: Path
) -> None:
    from model.checkpoint import load_checkpoint

    run_name = load_checkpoint(checkpoint)["config"]["name"]
    assert run_name != "tiny"
    assert bundle.name == "tiny"
    out = export_bundle(checkpoint, tmp_path / "unnamed")
    assert read_bundle_manifest(out)["name"] == run_name
    assert EncoderBundle.load(out, device="cpu").config["model"] == bundle.config["model"]


def test_concurrent_encoding_matches_sequential(
    bundle: EncoderBundle, images: list[np.ndarray]
) -> None:
    expected_texts = bundle.encode_texts(TEXTS)
    expected_images = bundle.encode_images(images)
    with ThreadPoolExecutor(max_workers=4) as pool:
        texts = list(pool.map(lambda _: bundle.encode_texts(TEXTS), range(8)))
        pictures = list(pool.map(lambda _: bundle.encode_images(images), range(4)))
    for result in texts:
        np.testing.assert_allclose(result, expected_texts, atol=1e-6)
    for result in pictures:
        np.testing.assert_allclose(result, expected_images, atol=1e-6)


def test_a_moved_bundle_needs_none_of_its_training_files(
    bundle_corpus: Path, tmp_path: Path, offline: None
) -> None:
    towers_root = tmp_path / "towers"
    config = tiny_config(bundle_corpus, tmp_path / "run", make_tiny_towers(towers_root))
    model = build_model(config.model)
    checkpoint = save_checkpoint(
        tmp_path / "best.pt", {"config": train_config_to_dict(config), "model": model.state_dict()}
    )
    exported = export_bundle(checkpoint, tmp_path / "exported")
    moved = Path(shutil.move(exported, tmp_path / "elsewhere"))
    # The towers' training-time directories are gone: only the bundle remains.
    shutil.rmtree(towers_root)
    checkpoint.unlink()
    bundle = EncoderBundle.load(moved, device="cpu")
    model.eval()
    with torch.inference_mode():
        expected = model.encode_text(model.tokenize(TEXTS)).numpy()
    np.testing.assert_allclose(bundle.encode_texts(TEXTS), expected, atol=1e-5)


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def _flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda d: _flip_byte(d / "model.safetensors"), id="weights"),
        pytest.param(
            lambda d: (d / "config.json").write_text(
                (d / "config.json").read_text().replace('"max"', '"mean"')
            ),
            id="config",
        ),
        pytest.param(
            lambda d: (d / "tokenizer" / "tokenizer.json").write_text(
                (d / "tokenizer" / "tokenizer.json").read_text().replace('"[UNK]"', '"[UNK2]"')
            ),
            id="tokenizer",
        ),
        pytest.param(lambda d: (d / "tokenizer" / "extra.json").write_text("{}"), id="extra"),
        pytest.param(lambda d: (d / "model.safetensors").unlink(), id="missing"),
    ],
)
def test_altered_bundles_are_refused(bundle_dir: Path, tmp_path: Path, alter: object) -> None:
    copy = _copy(bundle_dir, tmp_path)
    alter(copy)  # type: ignore[operator]
    with pytest.raises(BundleCorruptError) as info:
        EncoderBundle.load(copy, device="cpu")
    assert info.value.code == "bundle_corrupt"


def test_a_forged_model_id_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    copy = _copy(bundle_dir, tmp_path)
    manifest = json.loads((copy / "bundle.json").read_text())
    manifest["model_id"] = "sha256:" + "0" * 64
    (copy / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleCorruptError):
        EncoderBundle.load(copy, device="cpu")


@pytest.mark.parametrize(
    "alter",
    [
        pytest.param(lambda d: (d / "bundle.json").unlink(), id="no-manifest"),
        pytest.param(lambda d: (d / "bundle.json").write_text("{not json"), id="bad-json"),
        pytest.param(lambda d: (d / "bundle.json").write_text('{"format": "x"}'), id="format"),
    ],
)
def test_malformed_bundles_are_invalid(bundle_dir: Path, tmp_path: Path, alter: object) -> None:
    copy = _copy(bundle_dir, tmp_path)
    alter(copy)  # type: ignore[operator]
    with pytest.raises(BundleInvalidError) as info:
        EncoderBundle.load(copy, device="cpu")
    assert info.value.code == "bundle_invalid"


def test_a_missing_directory_is_invalid(tmp_path: Path) -> None:
    with pytest.raises(BundleInvalidError):
        EncoderBundle.load(tmp_path / "nothing", device="cpu")


def test_threaded_preprocessing_gives_the_same_vectors(
    bundle_dir: Path, bundle: EncoderBundle, images: list[np.ndarray]
) -> None:
    threaded = EncoderBundle.load(bundle_dir, device="cpu", preprocess_threads=3)
    expected = bundle.encode_images(images, batch_size=4)
    np.testing.assert_array_equal(threaded.encode_images(images, batch_size=4), expected)


def test_an_orthogonal_image_head_is_exported_as_its_polar_factor(
    tmp_path: Path, bundle_corpus: Path, towers: tuple[Path, Path]
) -> None:
    """The bundle's image head has orthonormal rows; the checkpoint keeps the learned one."""
    config = tiny_config(
        bundle_corpus,
        tmp_path / "run",
        towers,
        "model.projection.kind=linear",
        "model.projection.dim=8",
        "model.projection.image_orthogonal=true",
    )
    torch.manual_seed(0)
    model = build_model(config.model)
    learned = _head_weight(model, "image_projection").clone()  # (8, 16)
    checkpoint = save_checkpoint(
        tmp_path / "best.pt",
        {"kind": "weights", "config": train_config_to_dict(config), "model": model.state_dict()},
    )

    bundle = EncoderBundle.load(export_bundle(checkpoint, tmp_path / "bundle"), device="cpu")

    weight = _head_weight(bundle.model, "image_projection")
    torch.testing.assert_close(weight @ weight.T, torch.eye(8), atol=1e-5, rtol=0)
    u, _, vh = torch.linalg.svd(learned, full_matrices=False)
    torch.testing.assert_close(weight, u @ vh, atol=1e-5, rtol=0)
    # The text head is exported as it learned.
    torch.testing.assert_close(
        _head_weight(bundle.model, "text_projection"), _head_weight(model, "text_projection")
    )
    assert bundle.dim == 8


def _head_weight(model: object, head: str) -> torch.Tensor:
    """The weight of a linear projection head: (dim, in_dim)."""
    projection = getattr(model, head)
    assert isinstance(projection, ProjectionHead)
    linear = projection.net[0]
    assert isinstance(linear, torch.nn.Linear)
    return linear.weight.detach()
