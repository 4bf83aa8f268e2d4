"""The trainer's data: epoch order and sharding, per-sample seeds, the patient split, and
where training sentences are sampled from (``data.text_section``)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from model.config import InvalidConfigError
from model.data.manifest import read_manifest
from model.errors import ModelError
from model.inputs.reports import split_sentences
from model.training.config import load_train_config
from model.training.data import (
    EpochBatchSampler,
    TrainingDataError,
    sample_seed,
    split_records,
    training_text,
)

REPORT = (
    "FINDINGS: The heart size is normal. The mediastinal contours are normal. "
    "Moderate left pleural effusion. No pneumothorax.\n"
    "IMPRESSION: Moderate left pleural effusion."
)


def test_body_keeps_the_whole_report() -> None:
    assert training_text(REPORT, "body") == REPORT


def test_impression_samples_only_impression_sentences() -> None:
    text = training_text(REPORT, "impression")
    assert split_sentences(text) == ["Moderate left pleural effusion."]


def test_impression_falls_back_to_the_report_without_one() -> None:
    report = "The lungs are clear. No effusion."
    assert training_text(report, "impression") == report


def test_sampled_sentences_come_from_the_chosen_section() -> None:
    from model.inputs.reports import sample_sentence

    rng = random.Random(0)
    draws = {sample_sentence(training_text(REPORT, "impression"), rng) for _ in range(20)}
    assert draws == {"Moderate left pleural effusion."}
    body_draws = {sample_sentence(training_text(REPORT, "body"), rng) for _ in range(200)}
    assert len(body_draws) > 2


def test_unknown_section_is_refused_with_the_key_named() -> None:
    with pytest.raises(ModelError, match="text_section"):
        load_train_config("cpu-small", ["data.text_section=history"])


def test_section_override_is_read() -> None:
    config = load_train_config("cpu-small", ["data.text_section=impression"])
    assert config.data.text_section == "impression"


# --------------------------------------------------------------------------- data order


def test_sampler_shards_each_global_batch_and_resumes_mid_epoch() -> None:
    single = EpochBatchSampler(20, 4, seed=7)
    single.set_epoch(3)
    batches = list(single)
    assert len(batches) == 5
    assert all(epoch == 3 for batch in batches for epoch, _ in batch)
    assert sorted(i for batch in batches for _, i in batch) == list(range(20))
    # Two processes split every global batch into contiguous halves.
    ranks = [EpochBatchSampler(20, 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(3)
    for batch, half0, half1 in zip(batches, *ranks, strict=True):
        assert half0 + half1 == batch
    # Resuming at global batch 2 yields exactly the remaining batches.
    single.set_epoch(3, start_batch=2)
    assert list(single) == batches[2:]
    assert len(single) == 3
    # Another epoch, another order; the same epoch, the same order.
    single.set_epoch(4)
    assert list(single) != batches
    assert single.global_batch(3, 1) == [i for _, i in batches[1]]


def test_sampler_drops_the_incomplete_batch_and_checks_divisibility() -> None:
    assert len(EpochBatchSampler(21, 4, seed=0)) == 5
    with pytest.raises(InvalidConfigError):
        EpochBatchSampler(20, 6, seed=0, world_size=4)


def test_sample_seeds_depend_on_seed_epoch_and_index_only() -> None:
    assert sample_seed(0, 0, 1, 2) == sample_seed(0, 0, 1, 2)
    seeds = {sample_seed(s, 0, e, i) for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(seeds) == 8


def test_split_keeps_the_manifest_split_and_never_trains_on_test(
    corpus: Path, tmp_path: Path
) -> None:
    records = read_manifest(corpus)
    config = load_train_config("cpu-small", [f"data.source={corpus}", "data.batch_size=4"])
    train_records, val_records = split_records(records, config)
    assert {r.split for r in train_records} == {"train"}
    assert {r.split for r in val_records} == {"validate"}
    reassigned = load_train_config(
        "cpu-small",
        [f"data.source={corpus}", "data.batch_size=4", "data.use_manifest_split=false"],
    )
    train_records, val_records = split_records(records, reassigned)
    test_ids = {r.study_id for r in records if r.split == "test"}
    used = {r.study_id for r in train_records + val_records}
    assert not used & test_ids
    assert not {r.patient_id for r in train_records} & {r.patient_id for r in val_records}
    too_big = load_train_config("cpu-small", [f"data.source={corpus}", "data.batch_size=512"])
    with pytest.raises(TrainingDataError):
        split_records(records, too_big)
