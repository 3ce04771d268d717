"""Packed asymmetric quantization: exact packing, bounded error, bytes that are really the bits."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ojakv.quantize import _pack, _unpack, dequantize, quantize


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), groups=st.integers(1, 4), rows=st.integers(1, 5), seed=st.integers(0, 999))
def test_pack_unpack_is_lossless(bits, groups, rows, seed):
    group = 8 * groups
    codes = torch.randint(0, 2**bits, (rows, 3, group), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)
    packed = _pack(codes, bits)
    assert packed.shape[-1] == group * bits // 8
    assert torch.equal(_unpack(packed, bits, group), codes)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), dim=st.sampled_from([2, -1]), seed=st.integers(0, 999),
       scale=st.floats(1e-2, 1e3))
def test_error_is_at_most_half_a_step_and_bytes_are_the_bits(bits, dim, seed, scale):
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(seed)) * scale
    q = quantize(x, bits, dim=dim, group=32)
    back = dequantize(q, torch.float32)
    assert back.shape == x.shape
    step = q.scale.float().amax().item()
    assert (back - x).abs().max().item() <= 0.5 * step * 1.01 + 1e-3 * scale
    assert q.codes.numel() == x.numel() * bits // 8  # packed: bits, not bytes, per element
    assert q.scale.numel() == q.minimum.numel() == x.numel() // 32


def test_constant_groups_survive():
    x = torch.full((1, 1, 32, 8), 3.25)
    assert torch.allclose(dequantize(quantize(x, 2, dim=2, group=32), torch.float32), x, atol=1e-2)
