"""Imported CLIP and SigLIP bundles through ``convirt evaluate`` on the CheXpert 8x200 tree.

The official candidate and query files are laid out as a synthetic CheXpert tree (as in
test_evaluate_e2e), two tiny randomly initialised published-model families are imported,
and each is evaluated end to end. Their scores mean nothing (random weights); what is
checked is that the protocol runs at the model's own dimension, that the report names the
imported model and where it came from, and that no backbone baseline is invented for a
model that has none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.cli import main as cli_main
from model.data.synthetic import write_chexpert_tree
from tests.model.tiny_hf import save_tiny_clip, save_tiny_siglip

RENDER_PX = 64


@pytest.fixture(scope="module")
def tree(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base = tmp_path_factory.mktemp("import-e2e")
    protocol_dir = shared_dir / "protocols" / "chexpert-8x200"
    root = base / "chexpert"
    written = write_chexpert_tree(
        root,
        [
            protocol_dir / "image-retrieval" / "candidate.csv",
            protocol_dir / "image-retrieval" / "query.csv",
        ],
        size=RENDER_PX,
    )
    assert written == 1680
    return {"base": base, "root": root, "protocol_dir": protocol_dir}


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dim"), [("clip", 48), ("siglip", 32)])
def test_imported_models_are_evaluated_on_8x200(
    tree: dict[str, Path], family: str, dim: int, capsys: pytest.CaptureFixture[str]
) -> None:
    save = save_tiny_clip if family == "clip" else save_tiny_siglip
    source = save(tree["base"] / f"{family}-source")
    bundle = tree["base"] / f"{family}-bundle"
    assert cli_main(["import", str(source), "--out", str(bundle)]) == 0
    capsys.readouterr()
    out = tree["base"] / f"{family}-report"
    status = cli_main(
        [
            "evaluate",
            "--protocol",
            "chexpert-8x200",
            "--root",
            str(tree["root"]),
            "--protocol-dir",
            str(tree["protocol_dir"]),
            "--bundle",
            str(bundle),
            "--out",
            str(out),
        ]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads(Path(summary["report"]).read_text())
    counts = report["protocol"]["counts"]
    assert (counts["image_candidates"], counts["image_queries"], counts["text_queries"]) == (
        1600,
        80,
        40,
    )
    assert report["model"]["provenance"]["origin"] == "imported"
    assert report["model"]["provenance"]["source"] == str(source)
    assert report["backbone_baseline"] is None
    assert "backbone" not in report["results"]["image_to_image"]
    for task in ("image_to_image", "text_to_image"):
        model = report["results"][task]["model"]["mean"]
        assert 0.0 <= model["p@10"] <= 1.0
        assert report["results"][task]["random_expected"]["mean"]["p@10"] == 0.125
    assert report["embeddings"]["model"]["encoded"] == 1680
    markdown = (out / "report.md").read_text()
    assert f"imported from {source}" in markdown
