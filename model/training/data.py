"""What the trainer feeds on: records, patient-disjoint splits, the sampler and the dataset.

Exact resume rests on this module: the order of epoch ``e`` is a permutation drawn from
``(seed, e)`` alone, and the augmentation and sentence choice of sample ``i`` in epoch ``e``
from ``(seed, e, i)`` alone, so a run resumed at any optimizer step (mid-epoch included)
sees the very batches the uninterrupted run saw, whatever the number of DataLoader workers.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from model.config import InvalidConfigError
from model.data.manifest import PairedRecord
from model.errors import ModelError
from model.training.config import DataConfig, TrainConfig, parse_data_source

logger = logging.getLogger(__name__)

#: Seed streams: training draws and validation draws never share a generator.
_TRAIN_STREAM = 0
_VAL_STREAM = 1


class TrainingDataError(ModelError):
    """The configured data source yields too few usable pairs to train on."""

    code = "invalid_training_data"


def sample_seed(seed: int, stream: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` of ``epoch``: a pure function of its arguments."""
    state = np.random.SeedSequence([seed, stream, epoch, index]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The training order of ``epoch``: a permutation of ``range(n)`` drawn from (seed, epoch)."""
    rng = np.random.default_rng([seed, _TRAIN_STREAM, epoch])
    return rng.permutation(n)


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's share of each global batch as ``[(epoch, index), ...]``.

    The global batch ``b`` of an epoch is ``order[b*B:(b+1)*B]`` (``B`` = global batch size);
    process ``rank`` of ``world_size`` takes its contiguous slice of ``B / world_size``
    samples. The role of ``DistributedSampler``, plus what it lacks for exact resume: a
    start position within the epoch. The dataset receives the epoch with each index, so
    its random draws depend on (epoch, index) only. Runs in the main process, so
    :meth:`set_epoch` works with persistent DataLoader workers.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        num_batches: int | None = None,
    ) -> None:
        if batch_size % world_size:
            raise InvalidConfigError(
                f"data.batch_size: {batch_size} is not divisible by the {world_size} processes"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        full = num_samples // batch_size
        self.num_batches = full if num_batches is None else min(full, num_batches)
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate and the global batch to start from (resume)."""
        self.epoch = epoch
        self.start_batch = start_batch

    def global_batch(self, epoch: int, batch: int) -> list[int]:
        """Dataset indices of global batch ``batch`` of ``epoch`` (all processes together)."""
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, epoch)
        else:
            order = np.arange(self.num_samples)
        return [int(i) for i in order[batch * self.batch_size : (batch + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        else:
            order = np.arange(self.num_samples)
        local = self.batch_size // self.world_size
        for batch in range(self.start_batch, self.num_batches):
            start = batch * self.batch_size + self.rank * local
            yield [(self.epoch, int(i)) for i in order[start : start + local]]

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)


class PairDataset(Dataset[tuple[torch.Tensor, str]]):
    """Decoded, transformed radiograph and one sampled report sentence per ``(epoch, index)``.

    ``transform`` is a :class:`model.transforms.TrainTransform` (called with the sample's
    generator) when ``augment`` is True, else an :class:`model.transforms.EvalTransform`.
    The sentence is drawn with :func:`model.inputs.reports.sample_sentence` from the same
    generator, seeded by :func:`sample_seed`, out of the report's body or, with
    ``text_section="impression"``, its IMPRESSION section (see ``DataConfig``).
    """

    def __init__(
        self,
        records: Sequence[PairedRecord],
        transform: Callable[..., torch.Tensor],
        *,
        seed: int,
        augment: bool,
        text_section: str = "body",
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.seed = seed
        self.augment = augment
        self.text_section = text_section

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, str]:
        from model.inputs.decode import decode_file
        from model.inputs.reports import sample_sentence

        epoch, index = key
        record = self.records[index]
        stream = _TRAIN_STREAM if self.augment else _VAL_STREAM
        rng = random.Random(sample_seed(self.seed, stream, epoch, index))
        pixels = decode_file(record.image_path).pixels  # (H, W) in [0, 1]
        image = self.transform(pixels, rng) if self.augment else self.transform(pixels)
        return image, sample_sentence(training_text(record.report, self.text_section), rng)


def training_text(report: str, section: str) -> str:
    """The part of ``report`` that training sentences are sampled from (``text_section``)."""
    if section == "impression":
        from model.inputs.reports import parse_sections

        impression = parse_sections(report).get("IMPRESSION", "").strip()
        if impression:
            return impression
    return report


def collate_pairs(batch: Sequence[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    """Stack images to (B, 3, S, S); sentences stay strings (tokenized in the main process)."""
    images = torch.stack([image for image, _ in batch])  # (B, 3, S, S)
    return images, [text for _, text in batch]


def load_records(source: str) -> list[PairedRecord]:
    """The paired records of ``data.source``: a manifest path or an adapter prefix."""
    from model.data import datasets

    kind, location = parse_data_source(source)
    if kind == "manifest":
        return list(datasets.manifest_records(location))
    if kind == "mimic-cxr":
        return list(datasets.mimic_cxr_records(location))
    return list(datasets.iu_xray_records(location))


def split_records(
    records: Sequence[PairedRecord], config: TrainConfig
) -> tuple[list[PairedRecord], list[PairedRecord]]:
    """(train, validation) records: patient-disjoint, never touching the ``test`` split.

    Records without report text are dropped (they carry nothing to contrast with), and so
    are records of the ``test`` split. :func:`model.data.datasets.split_by_patient` keeps the
    manifest's own ``train``/``validate`` assignment when every record has one (and
    ``data.use_manifest_split`` is on), else assigns whole patients with a seeded hash so
    that ``data.val_fraction`` of them validate.
    """
    from model.data.datasets import split_by_patient

    data = config.data
    usable = [r for r in records if r.report.strip()]
    if len(usable) < len(records):
        logger.warning("%d records without report text skipped", len(records) - len(usable))
    usable = [r for r in usable if r.split != "test"]
    if not data.use_manifest_split:
        usable = [dataclasses.replace(r, split=None) for r in usable]
    fractions = {"train": 1.0 - data.val_fraction, "validate": data.val_fraction}
    parts = split_by_patient(usable, fractions, seed=config.train.seed)
    train, val = list(parts["train"]), list(parts["validate"])
    if data.limit is not None:
        train = train[: data.limit]
    if len(train) < data.batch_size:
        raise TrainingDataError(
            f"{len(train)} training pairs in {data.source!r}, fewer than one batch "
            f"of {data.batch_size}"
        )
    return train, val


def spread_image_batches(
    records: Sequence[PairedRecord],
    count: int,
    transform: Callable[[np.ndarray], torch.Tensor],
    batch_size: int,
) -> Iterator[torch.Tensor]:
    """(b, 3, S, S) batches of ``count`` images spread evenly over ``records``.

    Seen as evaluation sees them (``transform`` is an eval transform, no augmentation);
    nothing here draws random numbers, so a run's resume stays exact.
    """
    from model.inputs.decode import decode_file

    picks = np.unique(np.linspace(0, len(records) - 1, min(count, len(records))).round())
    chosen = [records[int(i)] for i in picks]
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start : start + batch_size]
        yield torch.stack([transform(decode_file(r.image_path).pixels) for r in batch])


def make_loader(
    dataset: PairDataset,
    sampler: EpochBatchSampler,
    data: DataConfig,
    *,
    seed: int,
    pin_memory: bool,
    persistent: bool = True,
) -> DataLoader[Any]:
    """A DataLoader over ``dataset`` in the order of ``sampler`` (batches come whole from it)."""
    workers = data.num_workers
    # A private generator keeps DataLoader's worker seeding off torch's global RNG,
    # whose state the checkpoint restores for dropout.
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_pairs,
        pin_memory=data.pin_memory and pin_memory,
        persistent_workers=persistent and workers > 0,
        generator=generator,
    )
