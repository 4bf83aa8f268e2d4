"""Projection heads: the paper's Linear–ReLU–Linear and the linear ablation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import InvalidConfigError, ProjectionConfig
from model.towers.heads import ProjectionHead


def test_nonlinear_head_is_linear_relu_linear_into_the_shared_dim() -> None:
    head = ProjectionHead(1280, ProjectionConfig())
    layers = list(head.net)
    assert [type(layer) for layer in layers] == [nn.Linear, nn.ReLU, nn.Linear]
    first, last = layers[0], layers[2]
    assert isinstance(first, nn.Linear)
    assert isinstance(last, nn.Linear)
    assert (first.in_features, first.out_features) == (1280, 1280)  # hidden = input
    assert (last.in_features, last.out_features) == (1280, 512)
    assert head(torch.randn(4, 1280)).shape == (4, 512)


def test_hidden_and_output_sizes_are_configurable() -> None:
    head = ProjectionHead(384, ProjectionConfig(dim=128, hidden_dim=64))
    assert head.net[0].out_features == 64
    assert head(torch.randn(2, 384)).shape == (2, 128)
    assert head.out_dim == 128


def test_linear_head_is_affine_and_nonlinear_head_is_not() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    linear = ProjectionHead(16, ProjectionConfig(dim=8, kind="linear"))
    assert len(linear.net) == 1
    # f(a + b) = f(a) + f(b) − f(0) holds exactly for an affine map.
    zero = torch.zeros(3, 16)
    torch.testing.assert_close(linear(a + b), linear(a) + linear(b) - linear(zero))
    nonlinear = ProjectionHead(16, ProjectionConfig(dim=8))
    assert not torch.allclose(nonlinear(a + b), nonlinear(a) + nonlinear(b) - nonlinear(zero))


def test_heads_do_not_normalise() -> None:
    head = ProjectionHead(16, ProjectionConfig(dim=8, kind="linear"))
    norms = head(100 * torch.randn(5, 16)).norm(dim=1)
    assert not torch.allclose(norms, torch.ones(5))


def test_bad_input_size_is_rejected() -> None:
    with pytest.raises(InvalidConfigError):
        ProjectionHead(0, ProjectionConfig())


def test_an_orthogonalised_head_keeps_distances_between_features() -> None:
    """However it learned, its polar factor has orthonormal rows: a square one bends no
    distance between features."""
    torch.manual_seed(0)
    config = ProjectionConfig(dim=16, kind="linear", image_orthogonal=True)
    head = ProjectionHead(16, config, orthogonal=True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        head(torch.randn(8, 16)).pow(3).sum().backward()
        optimizer.step()
    x = torch.randn(6, 16)
    with torch.no_grad():
        assert not torch.allclose(torch.cdist(head(x), head(x)), torch.cdist(x, x), atol=1e-2)
        head.orthogonalize_()
        linear = head.net[0]
        assert isinstance(linear, nn.Linear)
        weight = linear.weight
        torch.testing.assert_close(weight @ weight.T, torch.eye(16), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            torch.cdist(head(x), head(x)), torch.cdist(x, x), atol=1e-4, rtol=0
        )


def test_orthogonalising_keeps_the_learned_turn_and_drops_the_stretch() -> None:
    torch.manual_seed(1)
    head = ProjectionHead(
        32, ProjectionConfig(dim=8, kind="linear", image_orthogonal=True), orthogonal=True
    )
    linear = head.net[0]
    assert isinstance(linear, nn.Linear)
    u, _, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    x = torch.randn(4, 32)
    head.orthogonalize_()
    with torch.no_grad():
        torch.testing.assert_close(head(x), x @ (u @ vh).T + linear.bias)
        once = linear.weight.clone()
        head.orthogonalize_()  # a second time changes nothing
        torch.testing.assert_close(linear.weight, once, atol=1e-5, rtol=0)
    plain = ProjectionHead(32, ProjectionConfig(dim=8, kind="linear"))
    with pytest.raises(InvalidConfigError, match="not built to be orthogonal"):
        plain.orthogonalize_()


def test_orthogonal_heads_must_be_linear_and_no_wider_than_their_input() -> None:
    with pytest.raises(InvalidConfigError, match="linear"):
        ProjectionConfig(kind="nonlinear", image_orthogonal=True)
    with pytest.raises(InvalidConfigError, match="no wider"):
        ProjectionHead(
            16, ProjectionConfig(dim=32, kind="linear", image_orthogonal=True), orthogonal=True
        )
