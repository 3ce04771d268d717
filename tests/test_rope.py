"""RoPE on cached keys: ``Rotation`` against the half-split formula HF models use, out of place and in place."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ojakv.rope import Rotation


def rotate_half_reference(x, cos, sin):
    """HF's formula, on the first ``rotary_dim`` dims; the others pass through."""
    rotary = cos.shape[-1]
    part, rest = x[..., :rotary], x[..., rotary:]
    first, second = part[..., : rotary // 2], part[..., rotary // 2 :]
    rotated = part * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1)


def angles(n: int, rotary: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    theta = torch.rand(rotary // 2, generator=generator)
    phase = torch.arange(n, dtype=torch.float32)[:, None] * theta
    phase = torch.cat((phase, phase), dim=-1).unsqueeze(0)  # [1, n, rotary]
    return phase.cos(), phase.sin()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), half_rotary=st.integers(1, 4), extra=st.sampled_from([0, 2]), seed=st.integers(0, 99))
def test_rotation_in_place_and_out_of_place_match_the_half_split_formula(n, half_rotary, extra, seed):
    rotary = 2 * half_rotary
    cos, sin = angles(n, rotary, seed)
    x = torch.randn(1, 2, n, rotary + extra, generator=torch.Generator().manual_seed(seed + 1))
    expected = rotate_half_reference(x, cos.unsqueeze(1), sin.unsqueeze(1))
    rotation = Rotation(cos, sin)
    torch.testing.assert_close(rotation.apply(x), expected)
    torch.testing.assert_close(rotation.undo(expected), x, atol=1e-5, rtol=1e-5)
    fresh = x.clone()
    assert rotation.apply_(fresh) is fresh
    torch.testing.assert_close(fresh, expected)
    torch.testing.assert_close(rotation.narrow(0, n).apply_(x.clone()), expected)


def test_in_place_rotation_of_a_bfloat16_tensor_rounds_like_the_out_of_place_one():
    cos, sin = angles(5, 8, 0)
    x = torch.randn(1, 3, 5, 8).bfloat16()
    rotation = Rotation(cos, sin)
    torch.testing.assert_close(rotation.apply_(x.clone()), rotation.apply(x), atol=2e-2, rtol=2e-2)
