"""``convirt import``: tiny CLIP and SigLIP models become bundles that embed as they do.

The models are randomly initialised and saved with ``save_pretrained`` (tests/model/tiny_hf),
so everything runs offline; what is checked is that the bundle reproduces the published
model's own embeddings at its own dimension, records its provenance, and that failures
(unreachable hub id, a model that is not image–text) are clear errors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main as cli_main
from model.bundle import MANIFEST_FILE, EncoderBundle, bundle_init, read_bundle_manifest
from model.importing import ImportSourceError, import_model
from tests.model.tiny_hf import save_tiny_clip, save_tiny_siglip

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES: dict[str, tuple[Callable[[Path], Path], int]] = {
    "clip": (save_tiny_clip, 48),
    "siglip": (save_tiny_siglip, 32),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def imported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family = request.param
    save, dim = FAMILIES[family]
    base = tmp_path_factory.mktemp(f"import-{family}")
    source = save(base / "source")
    bundle_dir = import_model(str(source), base / "bundle", name=f"tiny-{family}")
    return {"family": family, "dim": dim, "source": source, "bundle_dir": bundle_dir}


def _radiograph(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((70, 60), dtype=np.float32)


def test_bundle_embeds_as_the_published_model_does(imported: dict) -> None:
    from transformers import AutoModel, AutoTokenizer

    bundle = EncoderBundle.load(imported["bundle_dir"], device="cpu")
    assert bundle.dim == imported["dim"]
    assert read_bundle_manifest(imported["bundle_dir"])["dim"] == imported["dim"]
    images = [_radiograph(0), _radiograph(1)]
    texts = ["left pleural effusion", "no acute cardiopulmonary process"]
    image_vectors = bundle.encode_images(images)
    text_vectors = bundle.encode_texts(texts)
    assert image_vectors.shape == (2, imported["dim"])
    assert text_vectors.shape == (2, imported["dim"])
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, atol=1e-5)

    # The same numbers from the original model, fed the bundle's preprocessing.
    original = AutoModel.from_pretrained(imported["source"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(imported["source"])
    with torch.inference_mode():
        pixels = bundle.preprocessing.stack(images)
        out = original.get_image_features(pixel_values=pixels)
        expected_images = getattr(out, "pooler_output", out)
        siglip = imported["family"] == "siglip"
        tokens = tokenizer(
            texts,
            padding="max_length" if siglip else True,
            max_length=16,
            truncation=True,
            return_tensors="pt",
        )
        kwargs = {"input_ids": tokens["input_ids"]}
        if not siglip:
            kwargs["attention_mask"] = tokens["attention_mask"]
        out = original.get_text_features(**kwargs)
        expected_texts = getattr(out, "pooler_output", out)
    expected_images = torch.nn.functional.normalize(expected_images, dim=-1).numpy()
    expected_texts = torch.nn.functional.normalize(expected_texts, dim=-1).numpy()
    np.testing.assert_allclose(image_vectors, expected_images, atol=1e-5)
    np.testing.assert_allclose(text_vectors, expected_texts, atol=1e-5)


def test_preprocessing_follows_the_image_processor(imported: dict) -> None:
    config = json.loads((imported["bundle_dir"] / "config.json").read_text())
    processor = json.loads((imported["source"] / "preprocessor_config.json").read_text())
    assert config["preprocessing"]["size"] == 32
    assert config["preprocessing"]["mean"] == pytest.approx(processor["image_mean"])
    assert config["preprocessing"]["std"] == pytest.approx(processor["image_std"])
    assert config["model"]["imported"]["model_type"] == imported["family"]


def test_provenance_names_the_source_and_the_model_id_is_reproducible(
    imported: dict, tmp_path: Path
) -> None:
    manifest = read_bundle_manifest(imported["bundle_dir"])
    assert manifest["provenance"]["origin"] == "imported"
    assert manifest["provenance"]["source"] == str(imported["source"])
    assert str(imported["source"]) in manifest["provenance"]["training_data"]
    again = import_model(str(imported["source"]), tmp_path / "again", name=manifest["name"])
    assert read_bundle_manifest(again)["model_id"] == manifest["model_id"]


def test_the_bundle_loads_without_its_source(imported: dict, tmp_path: Path) -> None:
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(imported["bundle_dir"], moved)
    hidden = tmp_path / "source-gone"
    imported["source"].rename(hidden)
    try:
        bundle = EncoderBundle.load(moved, device="cpu")
        assert bundle.encode_texts(["pneumothorax"]).shape == (1, imported["dim"])
    finally:
        hidden.rename(imported["source"])


def test_bundle_init_gives_the_weights_to_fine_tune_from(imported: dict) -> None:
    config, weights = bundle_init(imported["bundle_dir"])
    assert config.imported is not None
    assert config.projection.dim == imported["dim"]
    assert Path(config.imported.path_or_id).is_relative_to(imported["bundle_dir"].resolve())
    assert all(key.startswith("model.") for key in weights)


def test_unreachable_hub_id_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ImportSourceError) as caught:
        import_model("example-org/radiology-clip", tmp_path / "out")
    message = str(caught.value)
    assert "example-org/radiology-clip" in message
    assert "HF_HUB_OFFLINE" in message
    assert not (tmp_path / "out").exists()


def test_hub_failure_without_offline_flag_blames_the_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", unreachable)
    with pytest.raises(ImportSourceError, match="no network was available") as caught:
        import_model("example-org/radiology-clip", tmp_path / "out")
    assert "example-org/radiology-clip" in str(caught.value)


def test_a_text_only_model_is_refused(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from tests.model.tiny_hf import _tokenizer

    source = tmp_path / "bert"
    BertModel(
        BertConfig(
            vocab_size=128,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
        )
    ).save_pretrained(source)
    _tokenizer().save_pretrained(source)  # type: ignore[attr-defined]
    with pytest.raises(ImportSourceError):
        import_model(str(source), tmp_path / "out")


def test_cli_import_prints_the_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = save_tiny_clip(tmp_path / "clip", projection_dim=24)
    status = cli_main(["import", str(source), "--out", str(tmp_path / "b"), "--name", "tiny"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dim"] == 24
    assert summary["model_id"] == read_bundle_manifest(tmp_path / "b")["model_id"]
    # A second import into the same place needs --overwrite.
    assert cli_main(["import", str(source), "--out", str(tmp_path / "b")]) == 1


def test_bundles_without_provenance_still_load(bundle_dir: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "old"
    shutil.copytree(bundle_dir, old)
    manifest = json.loads((old / MANIFEST_FILE).read_text())
    manifest.pop("provenance", None)
    (old / MANIFEST_FILE).write_text(json.dumps(manifest))
    bundle = EncoderBundle.load(old, device="cpu")
    assert bundle.provenance["origin"] == "trained"
    assert "not recorded" in bundle.provenance["training_data"]
    assert bundle.provenance["synthetic_data"] is False


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model.data.synthetic import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("pairs"), 40, seed=3, size=64, progress=False)


def test_train_init_from_fine_tunes_an_imported_bundle(
    imported: dict, pairs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file

    run = tmp_path / "run"
    status = cli_main(
        [
            "train",
            "--init-from",
            str(imported["bundle_dir"]),
            "--data",
            str(pairs),
            "--out",
            str(run),
            "--max-steps",
            "3",
            "--no-progress",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.use_manifest_split=false",
            "optim.lr=1e-3",
            "train.precision=fp32",
        ]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3
    out = tmp_path / "tuned"
    assert cli_main(["export", str(run), "--out", str(out), "--name", "tuned"]) == 0
    tuned = EncoderBundle.load(out, device="cpu")
    assert tuned.dim == imported["dim"]
    assert tuned.provenance["origin"] == "trained"
    assert tuned.provenance["source"] == f"fine-tuned from {imported['source']}"
    assert str(pairs) in tuned.provenance["training_data"]
    # The ConVIRT loss moved the published weights: both towers changed, shapes did not.
    before = load_file(str(imported["bundle_dir"] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("vision" in k for k in changed)
    assert any("text" in k for k in changed)
    assert tuned.encode_texts(["pleural effusion"]).shape == (1, imported["dim"])


def test_init_from_and_resume_exclude_each_other(imported: dict, tmp_path: Path) -> None:
    status = cli_main(
        ["train", "--init-from", str(imported["bundle_dir"]), "--resume", str(tmp_path)]
    )
    assert status == 2
