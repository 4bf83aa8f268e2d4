"""The ConVIRT loss: bidirectional InfoNCE over the image–text pairs of a batch.

For a batch of N pairs with L2-normalised embeddings ``v_i`` (images) and ``u_i``
(texts), ConVIRT (eq. 1–3) sums two cross-entropies over cosine similarities divided
by the temperature τ:

    ℓ(v→u)_i = −log softmax_k(⟨v_i, u_k⟩ / τ)_i      (row i of the image→text logits)
    ℓ(u→v)_i = −log softmax_k(⟨u_i, v_k⟩ / τ)_i      (row i of the text→image logits)
    L = mean_i [ λ ℓ(v→u)_i + (1 − λ) ℓ(u→v)_i ]

Repeated sentences need no special targets. Short impressions repeat within a batch (in
the demo corpus about 14 of 32 rows share their sentence with another row), which looks
like false negatives, but pairs with the same sentence have the same text embedding:
their text→image rows are identical, so together they already put one −log p on every
image of the group, exactly what targets spread evenly over the group would give; and in
image→text, equal texts get equal probabilities. Only differently worded sentences of the
same finding stay each other's negatives.

Distributed training (``world_size > 1``): every rank gathers the embeddings of all
ranks, keeps its own slice as the local tensor (so the local rows always keep their
autograd path) and scores only its B local rows against all N = Σ B_r columns, with the
positive of local row i at column ``offset + i`` (``offset = rank * B`` for equal batches).

Scaling. Each rank returns the mean over its local rows. The default gather is
``torch.distributed.nn.functional.all_gather``, whose backward sums, over all ranks, the
gradient every rank's loss sends to a slice and hands it to the slice's owner. Rank r's
parameter gradient is therefore ∂(Σ_s L_s)/∂θ through r's own samples, and DDP's average
over the W ranks gives ∂((1/W) Σ_s L_s)/∂θ. Since (1/W) Σ_s L_s = (1/N) Σ_rows ℓ_row is
exactly the single-process loss on the global batch, the scale factor is 1: no extra
multiplication is applied, and the mean of the per-rank loss values is the global loss.

A gather without gradient (plain ``torch.distributed.all_gather``) would drop the terms
of the other ranks' rows in which a local sample is a column (the negatives it serves
elsewhere); no constant rescaling restores them, which is why the default gathers with
gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model.errors import ModelError

#: Takes the local (B, D) tensor, returns one (B_r, D) tensor per rank, in rank order.
GatherFn = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class LossInputError(ModelError):
    """The embeddings given to the loss do not form a batch of pairs."""

    code = "invalid_loss_input"


class InvalidLossConfigError(ModelError):
    """The loss was built with an impossible temperature, weight or rank layout."""

    code = "invalid_config"


def all_gather_with_grad(tensor: torch.Tensor) -> list[torch.Tensor]:
    """All-gather (B, D) across the default process group, differentiably.

    Returns W tensors of shape (B, D); their backward reduce-scatters (sums) gradients
    back to the rank that owns each slice. Needs equal B on every rank.
    """
    import torch.distributed.nn.functional as dist_fn

    return list(dist_fn.all_gather(tensor))


class ConVIRTLoss(nn.Module):
    """Bidirectional InfoNCE with temperature τ and weight λ on image→text.

    Args:
        temperature: τ > 0 dividing the cosine similarities.
        lambda_: weight of the image→text term; the text→image term gets ``1 − λ``.
        rank: this process's rank in ``[0, world_size)``.
        world_size: number of data-parallel processes; 1 means no gathering.
        gather_fn: replaces :func:`all_gather_with_grad` (tests, other backends).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        lambda_: float = 0.75,
        *,
        rank: int = 0,
        world_size: int = 1,
        gather_fn: GatherFn | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0.0:
            raise InvalidLossConfigError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= lambda_ <= 1.0:
            raise InvalidLossConfigError(f"lambda_ must lie in [0, 1], got {lambda_}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidLossConfigError(f"rank {rank} is not within world size {world_size}")
        self.temperature = temperature
        self.lambda_ = lambda_
        self.rank = rank
        self.world_size = world_size
        self.gather_fn: GatherFn = gather_fn if gather_fn is not None else all_gather_with_grad

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, lambda_={self.lambda_}, "
            f"rank={self.rank}, world_size={self.world_size}"
        )

    def _gather(self, local: torch.Tensor) -> tuple[torch.Tensor, int]:
        """All ranks' rows (N, D), with the local slice replaced by ``local``, and its offset."""
        parts = list(self.gather_fn(local))
        if len(parts) != self.world_size:
            raise LossInputError(
                f"gather returned {len(parts)} tensors for a world size of {self.world_size}"
            )
        if parts[self.rank].shape != local.shape:
            raise LossInputError(
                f"gathered slice of rank {self.rank} has shape {tuple(parts[self.rank].shape)}, "
                f"the local batch {tuple(local.shape)}"
            )
        parts[self.rank] = local
        offset = sum(int(p.shape[0]) for p in parts[: self.rank])
        return torch.cat(parts, dim=0), offset

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        """Scalar loss of the local batch.

        Args:
            image_emb: (B, D) L2-normalised image embeddings of this rank.
            text_emb: (B, D) L2-normalised text embeddings; row i pairs with image row i.
        """
        if image_emb.ndim != 2 or image_emb.shape != text_emb.shape or image_emb.shape[0] == 0:
            raise LossInputError(
                f"expected two non-empty (B, D) tensors of equal shape, got "
                f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
            )
        if self.world_size > 1:
            all_images, offset = self._gather(image_emb)  # (N, D)
            all_texts, _ = self._gather(text_emb)  # (N, D)
        else:
            all_images, all_texts, offset = image_emb, text_emb, 0
        logits_i2t = image_emb @ all_texts.T / self.temperature  # (B, N)
        logits_t2i = text_emb @ all_images.T / self.temperature  # (B, N)
        labels = torch.arange(image_emb.shape[0], device=image_emb.device) + offset  # (B,)
        loss_i2t = F.cross_entropy(logits_i2t, labels)
        loss_t2i = F.cross_entropy(logits_t2i, labels)
        return self.lambda_ * loss_i2t + (1.0 - self.lambda_) * loss_t2i
