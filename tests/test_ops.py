"""Unit tests of the shared tensor helpers in artplug.ops (public through ``artplug``)."""

from __future__ import annotations

import pytest
import torch

import artplug


def test_project_ball_linf_clips_each_coordinate_without_the_box() -> None:
    delta = torch.tensor([[0.5, -0.05, -1.5], [0.0, 0.1, -0.2]], dtype=torch.float64)
    out = artplug.project_ball(delta, artplug.Threat("linf", 0.1))
    expected = torch.tensor([[0.1, -0.05, -0.1], [0.0, 0.1, -0.1]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)


def test_project_ball_l2_rescales_only_examples_outside() -> None:
    # Row 0 has norm 5 (3-4-0 triangle) and goes onto the sphere of radius 0.5; row 1 (norm
    # 0.25) is inside and stays; row 2 is zero and stays zero (no division by zero). Negative
    # entries stay negative: no [0, 1] clip.
    delta = torch.tensor(
        [[3.0, -4.0, 0.0], [0.0, 0.15, -0.2], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    out = artplug.project_ball(delta, artplug.Threat("l2", 0.5))
    expected = torch.tensor(
        [[0.3, -0.4, 0.0], [0.0, 0.15, -0.2], [0.0, 0.0, 0.0]], dtype=torch.float64
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_project_is_project_ball_then_the_box() -> None:
    x = torch.tensor([[[0.0, 0.95]], [[0.5, 0.5]]], dtype=torch.float64)
    x_adv = torch.tensor([[[-0.3, 1.2]], [[0.56, 0.42]]], dtype=torch.float64)
    out = artplug.project(x_adv, x, artplug.Threat("linf", 0.1))
    # Ball: deltas clipped to ±0.1 -> x + (-0.1, 0.1) and x + (0.06, -0.08); box: [0, 1].
    expected = torch.tensor([[[0.0, 1.0]], [[0.56, 0.42]]], dtype=torch.float64)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_full_precision_upcasts_half_precision(dtype: torch.dtype) -> None:
    t = torch.tensor([0.5, -1.25], dtype=dtype)
    out = artplug.full_precision(t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([0.5, -1.25]), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_keeps_full_precision(dtype: torch.dtype) -> None:
    t = torch.tensor([0.1, 0.2], dtype=dtype)
    assert artplug.full_precision(t) is t
