"""Subspace arithmetic: orthonormality, Oja's rule, tracking a moving subspace, re-expression."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ojakv.subspace import (
    change_of_basis,
    covariance,
    oja_step,
    orthogonality_error,
    orthonormalize,
    pca_basis,
    principal_angle_error,
    rank_for_energy,
)

shapes = st.tuples(st.integers(1, 3), st.integers(2, 24)).flatmap(
    lambda bd: st.tuples(st.just(bd[0]), st.just(bd[1]), st.integers(1, bd[1]))
)


def _random_basis(batch, d, r, seed):
    gen = torch.Generator().manual_seed(seed)
    return orthonormalize(torch.randn(batch, d, r, generator=gen))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), eta=st.floats(0.0, 1.0), scale=st.floats(1e-3, 1e4))
def test_oja_step_keeps_bases_orthonormal(shape, seed, eta, scale):
    batch, d, r = shape
    u = _random_basis(batch, d, r, seed)
    x = torch.randn(batch, 50, d, generator=torch.Generator().manual_seed(seed + 1)) * scale
    cov, _ = covariance(x)
    new = oja_step(u, cov @ u, eta)
    assert torch.isfinite(new).all()
    assert orthogonality_error(new) <= 1e-5


@settings(max_examples=20, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000))
def test_oja_step_is_scale_invariant_and_inert_on_zero_data(shape, seed):
    batch, d, r = shape
    u = _random_basis(batch, d, r, seed)
    x = torch.randn(batch, 30, d, generator=torch.Generator().manual_seed(seed + 1))
    cov, _ = covariance(x)
    a = oja_step(u, cov @ u, 0.1)
    b = oja_step(u, (1000.0 * cov) @ u, 0.1)
    assert torch.allclose(a, b, atol=1e-4)
    zero = oja_step(u, torch.zeros_like(u), 0.1)
    assert torch.allclose(zero, u, atol=1e-6)


def test_orthonormalize_keeps_column_orientation():
    u = _random_basis(2, 10, 4, 0)
    nudged = orthonormalize(u + 1e-3 * torch.randn(2, 10, 4))
    # Each column stays close to its old self (no sign flips), so re-expression is near the identity.
    assert (torch.diagonal(change_of_basis(u, nudged), dim1=-2, dim2=-1) > 0.99).all()


def _rotating_stream(d=16, r=3, steps=60, per_step=64, angle=0.05, seed=0):
    """Batches of data from an r-dim subspace that turns by about ``angle`` radians per batch."""
    gen = torch.Generator().manual_seed(seed)
    skew = torch.randn(d, d, generator=gen)
    skew = skew - skew.T
    turn = torch.linalg.matrix_exp(angle * skew / torch.linalg.matrix_norm(skew, 2))
    basis = orthonormalize(torch.randn(d, r, generator=gen))
    for _ in range(steps):
        basis = turn @ basis
        coeffs = torch.randn(per_step, r, generator=gen) * torch.tensor([3.0, 2.0, 1.5])
        yield basis, coeffs @ basis.T + 0.01 * torch.randn(per_step, d, generator=gen)


def test_online_basis_tracks_a_rotating_subspace_while_a_static_one_does_not():
    stream = list(_rotating_stream())
    static = pca_basis(covariance(stream[0][1])[0], 3)
    online = orthonormalize(torch.randn(16, 3, generator=torch.Generator().manual_seed(5)))  # a wrong start
    static_err, online_err = [], []
    for truth, x in stream[1:]:
        cov, _ = covariance(x)
        online = oja_step(online, cov @ online, 0.5)
        static_err.append(principal_angle_error(static, truth).item())
        online_err.append(principal_angle_error(online, truth).item())
    # The online error falls from its wrong start and stays low; the static basis drifts off the data.
    assert online_err[0] > 0.6 and max(online_err[15:]) < 0.45
    assert static_err[0] < 0.2 and static_err[-1] > 0.9
    assert sum(online_err[-10:]) < 0.4 * sum(static_err[-10:])


def test_re_expression_is_the_projection_of_what_was_stored():
    old = _random_basis(1, 12, 5, 1)
    new = _random_basis(1, 12, 5, 2)
    coef = torch.randn(1, 7, 5)
    stored = coef @ old.transpose(-1, -2)
    moved = (coef @ change_of_basis(old, new)) @ new.transpose(-1, -2)
    projection = stored @ new @ new.transpose(-1, -2)
    assert torch.allclose(moved, projection, atol=1e-5)
    # Lossless when the new basis spans the same subspace (here: a rotation within it).
    rotation = orthonormalize(torch.randn(1, 5, 5))
    same_span = old @ rotation
    moved = (coef @ change_of_basis(old, same_span)) @ same_span.transpose(-1, -2)
    assert torch.allclose(moved, stored, atol=1e-5)


def test_rank_for_energy_on_hand_made_spectra():
    assert rank_for_energy(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 0.71) == 3
    assert rank_for_energy(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 0.7) == 2
    assert rank_for_energy(torch.tensor([[4.0, 3.0, 2.0, 1.0]]), 0.39) == 1
    assert rank_for_energy(torch.tensor([[1.0, 0.0, 0.0]]), 0.99) == 1
    # The rank is the maximum over heads.
    assert rank_for_energy(torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), 0.99) == 3


def test_covariance_ignores_weighted_out_rows():
    x = torch.randn(2, 10, 4)
    weight = torch.ones(2, 10)
    weight[:, :3] = 0
    cov, count = covariance(x, weight)
    assert torch.allclose(cov, x[:, 3:].transpose(-1, -2) @ x[:, 3:], atol=1e-5)
    assert count.tolist() == [7.0, 7.0]


def test_principal_angle_error_extremes():
    u = _random_basis(1, 8, 2, 3)
    assert principal_angle_error(u, u).item() < 1e-3
    e = torch.eye(8)
    assert math.isclose(principal_angle_error(e[:, :2], e[:, 2:4]).item(), 1.0, abs_tol=1e-6)
