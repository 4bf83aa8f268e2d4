"""ConVIRT loss against a loop reference, λ/τ effects, and simulated and real world size 2."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.errors import ModelError
from model.loss import ConVIRTLoss, LossInputError


def _embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    texts = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    return images.requires_grad_(), texts.requires_grad_()


def _reference(
    images: torch.Tensor,
    texts: torch.Tensor,
    tau: float,
    lam: float,
    keys: Sequence[int] | None = None,
) -> float:
    """Per-pair −log softmax written out as loops over the rows and columns (eq. 1–3).

    With ``keys``, each row's −log softmax is averaged over every column whose key equals
    the row's (targets spread evenly over a sentence's pairs); without, the key is the row.
    """
    n = images.shape[0]
    keys = range(n) if keys is None else keys
    sim = [[(images[i] @ texts[k]).item() / tau for k in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        same = [k for k in range(n) if keys[k] == keys[i]]
        row = sum(math.exp(sim[i][k]) for k in range(n))
        column = sum(math.exp(sim[k][i]) for k in range(n))
        image_to_text = -sum(math.log(math.exp(sim[i][k]) / row) for k in same) / len(same)
        text_to_image = -sum(math.log(math.exp(sim[k][i]) / column) for k in same) / len(same)
        total += lam * image_to_text + (1 - lam) * text_to_image
    return total / n


@pytest.mark.parametrize(("tau", "lam"), [(0.1, 0.75), (0.5, 0.0), (1.0, 1.0), (0.07, 0.3)])
def test_matches_the_loop_reference(tau: float, lam: float) -> None:
    images, texts = _embeddings(7, 5, seed=0)
    loss = ConVIRTLoss(temperature=tau, lambda_=lam)(images, texts)
    assert loss.ndim == 0
    assert loss.item() == pytest.approx(_reference(images, texts, tau, lam), rel=1e-10)


def test_lambda_weights_the_two_directions() -> None:
    images, texts = _embeddings(6, 4, seed=1)
    i2t = ConVIRTLoss(lambda_=1.0)(images, texts)
    t2i = ConVIRTLoss(lambda_=0.0)(images, texts)
    # Image→text and text→image differ on a random batch: the row and column softmaxes differ.
    assert i2t.item() != pytest.approx(t2i.item(), rel=1e-3)
    mixed = ConVIRTLoss(lambda_=0.75)(images, texts)
    assert mixed.item() == pytest.approx(0.75 * i2t.item() + 0.25 * t2i.item(), rel=1e-12)
    # Swapping the modalities swaps the directions.
    swapped = ConVIRTLoss(lambda_=0.0)(texts, images)
    assert swapped.item() == pytest.approx(i2t.item(), rel=1e-12)


def test_temperature_sharpens_the_loss_of_a_well_aligned_batch() -> None:
    images, _ = _embeddings(8, 16, seed=2)
    noise = torch.randn(
        images.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    texts = F.normalize(images.detach() + 0.1 * noise, dim=1)
    losses = [ConVIRTLoss(temperature=t)(images, texts).item() for t in (1.0, 0.3, 0.1, 0.03)]
    # With positives the most similar pairs, a colder softmax leaves less mass on negatives.
    assert losses == sorted(losses, reverse=True)
    assert losses[-1] < 0.05
    # At high temperature every pair looks alike: the loss approaches log N.
    warm = ConVIRTLoss(temperature=1e4)(images, texts).item()
    assert warm == pytest.approx(math.log(8), rel=1e-3)


def test_gradient_pulls_positives_together() -> None:
    images, texts = _embeddings(5, 8, seed=4)
    ConVIRTLoss()(images, texts).backward()
    assert images.grad is not None
    # A small step against the gradient must raise every positive's similarity on average.
    before = (images * texts).sum(dim=1).mean()
    after = ((images - 1e-2 * images.grad) * texts).sum(dim=1).mean()
    assert after.item() > before.item()


def _split_gather(
    halves: dict[int, Sequence[torch.Tensor]], detach_others: bool, rank: int
) -> object:
    def gather(local: torch.Tensor) -> list[torch.Tensor]:
        parts = list(halves[id(local)])
        return [
            local if r == rank else (p.detach() if detach_others else p)
            for r, p in enumerate(parts)
        ]

    return gather


def _two_rank_losses(
    images: torch.Tensor, texts: torch.Tensor, detach_others: bool
) -> list[torch.Tensor]:
    """Run the loss as ranks 0 and 1 of a world of 2, each seeing half of the batch."""
    image_halves = images.chunk(2)
    text_halves = texts.chunk(2)
    losses = []
    for rank in range(2):
        local_images, local_texts = image_halves[rank], text_halves[rank]
        halves = {id(local_images): image_halves, id(local_texts): text_halves}
        loss_fn = ConVIRTLoss(
            rank=rank,
            world_size=2,
            gather_fn=_split_gather(halves, detach_others, rank),  # type: ignore[arg-type]
        )
        losses.append(loss_fn(local_images, local_texts))
    return losses


def test_world_size_two_combines_to_the_global_loss_and_gradient() -> None:
    images, texts = _embeddings(8, 6, seed=5)
    global_loss = ConVIRTLoss()(images, texts)
    global_grads = torch.autograd.grad(global_loss, [images, texts])

    losses = _two_rank_losses(images, texts, detach_others=False)
    # DDP averages the ranks' gradients: the average of the per-rank losses is what is trained.
    averaged = (losses[0] + losses[1]) / 2
    assert averaged.item() == pytest.approx(global_loss.item(), rel=1e-12)
    rank_grads = torch.autograd.grad(averaged, [images, texts])
    for got, expected in zip(rank_grads, global_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_gather_without_gradient_loses_the_cross_rank_terms() -> None:
    images, texts = _embeddings(8, 6, seed=6)
    global_grads = torch.autograd.grad(ConVIRTLoss()(images, texts), [images, texts])
    losses = _two_rank_losses(images, texts, detach_others=True)
    # Local rows keep their gradient even when the gather returns detached copies ...
    rank_grads = torch.autograd.grad((losses[0] + losses[1]) / 2, [images, texts])
    assert all(bool(g.abs().sum() > 0) for g in rank_grads)
    # ... but the other ranks' rows no longer reach the local samples used as their negatives.
    assert not torch.allclose(rank_grads[0], global_grads[0], rtol=1e-3, atol=1e-6)


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        images, texts = _embeddings(8, 6, seed=7)
        local_images = images.detach()[rank * 4 : (rank + 1) * 4].clone().requires_grad_()
        local_texts = texts.detach()[rank * 4 : (rank + 1) * 4].clone().requires_grad_()
        loss = ConVIRTLoss(rank=rank, world_size=world_size)(local_images, local_texts)
        loss.backward()
        grads = [local_images.grad, local_texts.grad]
        torch.save({"loss": loss.detach(), "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
        # Tearing down gloo while the peer is still inside a collective aborts the process
        # ("terminate called without an active exception"): meet first, then leave.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_real_process_group_of_two_matches_the_global_batch(tmp_path: Path) -> None:
    try:
        mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    except mp.ProcessExitedException:
        # Now and then gloo still aborts a process while tearing down, after the barrier
        # (so after both ranks saved their results): those results are what is checked
        # here. A rank that died before saving fails the test.
        if not all((tmp_path / f"rank{r}.pt").exists() for r in range(2)):
            raise
    images, texts = _embeddings(8, 6, seed=7)
    global_loss = ConVIRTLoss()(images, texts)
    global_grads = torch.autograd.grad(global_loss, [images, texts])
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    mean_loss = (results[0]["loss"] + results[1]["loss"]) / 2
    assert mean_loss.item() == pytest.approx(global_loss.item(), rel=1e-10)
    for rank, result in enumerate(results):
        rows = slice(rank * 4, (rank + 1) * 4)
        # DDP averages the parameter gradients of the W ranks, so what a rank's samples
        # contribute is their gradient divided by W: it must be their global-batch gradient.
        for got, expected in zip(result["grads"], global_grads, strict=True):
            torch.testing.assert_close(got / 2, expected[rows], rtol=1e-10, atol=1e-12)


def test_rejects_mismatched_inputs_and_bad_settings() -> None:
    images, texts = _embeddings(4, 3, seed=8)
    with pytest.raises(LossInputError) as info:
        ConVIRTLoss()(images, texts[:3])
    assert info.value.code == "invalid_loss_input"
    with pytest.raises(ModelError):
        ConVIRTLoss(temperature=0.0)
    with pytest.raises(ModelError):
        ConVIRTLoss(lambda_=1.5)
    with pytest.raises(ModelError):
        ConVIRTLoss(rank=2, world_size=2)
    loss = ConVIRTLoss(rank=0, world_size=3, gather_fn=lambda x: [x, x])
    with pytest.raises(LossInputError, match="world size of 3"):
        loss(images, texts)


@pytest.mark.parametrize(("tau", "lam"), [(0.1, 0.75), (0.5, 0.0), (0.07, 1.0)])
def test_repeated_sentences_are_already_shared_positives(tau: float, lam: float) -> None:
    # Rows 0, 2 and 5 carry one sentence, rows 1 and 4 another: their text embeddings are
    # the same. The paper's one-positive targets must then equal targets spread evenly over
    # every image of a sentence, so no special handling of repeats is needed (module doc).
    keys = (3, 7, 3, 9, 7, 3, 1)
    images, texts = _embeddings(len(keys), 5, seed=10)
    first = {key: i for i, key in reversed(list(enumerate(keys)))}
    repeated = texts.detach()[[first[key] for key in keys]]
    loss = ConVIRTLoss(temperature=tau, lambda_=lam)(images, repeated)
    assert loss.item() == pytest.approx(_reference(images, repeated, tau, lam, keys), rel=1e-10)
