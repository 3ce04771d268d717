"""Subspace arithmetic for low-rank KV storage: PCA, Oja's rule, orthonormalisation, re-expression.

Every function works on batched bases ``U`` of shape ``[..., d, r]`` with orthonormal columns and runs in float32
whatever the model's dtype: the updates are small differences of large numbers, and fp16/bf16 would lose them.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def orthonormalize(u: torch.Tensor) -> torch.Tensor:
    """QR re-orthonormalisation that keeps each column's orientation.

    Plain QR may flip column signs from one call to the next; fixing diag(R) > 0 makes the new basis the closest
    orthonormal basis to ``u`` column by column, so re-expressing stored coefficients stays near the identity.
    """
    q, r = torch.linalg.qr(u.float())
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def covariance(x: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uncentred second moment of features ``x`` [..., n, d]: returns (Σ xxᵀ, count).

    ``weight`` [..., n] (0/1) excludes rows such as padding; counts are per leading index.
    """
    x = x.float()
    if weight is not None:
        x = x * weight.unsqueeze(-1).to(x.dtype)
        count = weight.to(torch.float32).sum(-1)
    else:
        count = torch.full(x.shape[:-2], float(x.shape[-2]), dtype=torch.float32, device=x.device)
    return x.transpose(-1, -2) @ x, count


def eigh_descending(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (matching columns) of symmetric ``cov`` [..., d, d]."""
    vals, vecs = torch.linalg.eigh(cov.double())
    vals = vals.flip(-1).clamp_min(0.0)
    vecs = vecs.flip(-1)
    return vals.float(), vecs.float()


def rank_for_energy(eigenvalues: torch.Tensor, energy: float) -> int:
    """Smallest rank whose leading eigenvalues hold ``energy`` of the total, maximised over leading indices.

    Energy is measured on eigenvalues of the second moment (λ, i.e. σ²), not singular values.
    """
    total = eigenvalues.sum(-1, keepdim=True).clamp_min(EPS)
    cumulative = eigenvalues.cumsum(-1) / total
    reached = (cumulative < energy - 1e-7).sum(-1) + 1
    return int(reached.max().clamp(max=eigenvalues.shape[-1]).item())


def pca_basis(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of ``cov`` [..., d, d] as an orthonormal basis [..., d, rank]."""
    _, vecs = eigh_descending(cov)
    return vecs[..., :rank].contiguous()


def oja_step(u: torch.Tensor, cu: torch.Tensor, eta: float) -> torch.Tensor:
    """One step of Oja's subspace rule, ``U + η(CU − U UᵀCU)/λ̂``, then QR.

    ``cu`` is C·U for the (uncentred) feature covariance C of the new data. C is scaled by λ̂, the largest
    eigenvalue of UᵀCU (C restricted to the current subspace; equal to ‖C‖₂ once U holds C's top direction).
    That makes η a relative step size: the update is invariant to the features' scale, and η·λ ≤ η for every
    direction the basis already sees. Where C is zero (no data, all-zero features) the basis is left unchanged.
    """
    u = u.float()
    cu = cu.float()
    utcu = u.transpose(-1, -2) @ cu
    utcu = 0.5 * (utcu + utcu.transpose(-1, -2))
    lam = torch.linalg.eigvalsh(utcu.double())[..., -1].float()
    # If C vanishes on span(U) but not elsewhere, fall back to the column norm of CU as the scale.
    lam = torch.maximum(lam, cu.norm(dim=-2).amax(-1))
    active = lam > EPS
    scale = torch.where(active, eta / lam.clamp_min(EPS), torch.zeros_like(lam))
    step = (cu - u @ utcu) * scale[..., None, None]
    return orthonormalize(u + step)


def change_of_basis(u_old: torch.Tensor, u_new: torch.Tensor) -> torch.Tensor:
    """Matrix M = U_oldᵀ U_new [..., r, r]: coefficients c made in U_old become c·M in U_new.

    c·M are the coordinates of the orthogonal projection of the stored reconstruction U_old c onto span(U_new):
    the closest vector the new basis can represent. It is exact when span(U_new) contains U_old c.
    """
    return u_old.float().transpose(-1, -2) @ u_new.float()


def principal_angle_error(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sin of the largest principal angle between span(u) and span(v) (0 = same subspace, 1 = orthogonal)."""
    s = torch.linalg.svdvals(u.float().transpose(-1, -2) @ v.float())
    smallest = s[..., -1].clamp(max=1.0)
    return torch.sqrt((1.0 - smallest**2).clamp_min(0.0))


def orthogonality_error(u: torch.Tensor) -> torch.Tensor:
    """max |UᵀU − I| over the batch: how far a basis is from orthonormal."""
    eye = torch.eye(u.shape[-1], dtype=torch.float32, device=u.device)
    return (u.float().transpose(-1, -2) @ u.float() - eye).abs().amax()
