"""Test-time views: the D4 group of overhead imagery, parsing, averaging."""

from __future__ import annotations

import pytest
import torch

from rsitr.errors import ConfigError
from rsitr.retrieval.embed import VIEWS, apply_view, average_views, parse_views


def test_the_eight_views_are_the_distinct_elements_of_d4() -> None:
    x = torch.arange(9.0).reshape(1, 3, 3)
    outs = {tuple(apply_view(x, v).reshape(-1).tolist()) for v in VIEWS}
    assert len(outs) == 8
    assert apply_view(x, "rot90").tolist() == [[[2.0, 5.0, 8.0], [1.0, 4.0, 7.0], [0.0, 3.0, 6.0]]]
    assert torch.equal(apply_view(x, "transpose"), x.transpose(-2, -1))
    assert torch.equal(apply_view(x, "antitranspose"), x.flip(-1).flip(-2).transpose(-2, -1))
    assert torch.equal(apply_view(apply_view(x, "rot90"), "rot270"), x)


def test_parse_views() -> None:
    assert parse_views("none") == ("identity",)
    assert parse_views("flips") == ("identity", "hflip", "vflip")
    assert len(parse_views("d4")) == 8
    assert parse_views("rot90, hflip,rot90") == ("rot90", "hflip")
    with pytest.raises(ConfigError, match="unknown view 'sideways'"):
        parse_views("identity,sideways")


def test_average_views_is_the_normalised_mean_of_unit_vectors() -> None:
    a = torch.tensor([[3.0, 0.0]])
    b = torch.tensor([[0.0, 0.5]])
    got = average_views([a, b])
    assert torch.allclose(got, torch.tensor([[2**-0.5, 2**-0.5]]))
    assert average_views([a]) is a
