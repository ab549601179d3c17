"""Small layers shared by the stage blocks and the hierarchical model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``; ``eps`` guards an all-zero row (MEGABYTE's norm)."""

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eps is added under the root: eps**2 there equals a clamp of the rms at eps
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps * self.eps)


def token_shift(x: torch.Tensor) -> torch.Tensor:
    """Shift the second half of the features one position later in the sequence (RWKV).

    x: (..., S, D) -> (..., S, D); the first ceil(D/2) features stay in place.
    """
    keep = (x.shape[-1] + 1) // 2
    shifted = F.pad(x[..., keep:], (0, 0, 1, -1))  # (..., S, D - keep)
    return torch.cat((x[..., :keep], shifted), dim=-1)


def shift_after(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """:func:`token_shift` of one new position: x (n, 1, D) after ``prev`` (n, D), the
    previous position's input (zeros before the first position)."""
    keep = (x.shape[-1] + 1) // 2
    return torch.cat((x[..., :keep], prev[:, None, keep:]), dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_angles(
    seq_len: int,
    dim: int,
    device: torch.device,
    offset: int = 0,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Angles for rotary attention in the half-split layout, theta 10,000.

    Positions ``offset .. offset + seq_len - 1``: (S, dim); or explicit ``positions`` of any
    shape (...): (..., dim), e.g. one position per row when decoding rows at different places.
    """
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    if positions is None:
        positions = torch.arange(offset, offset + seq_len, device=device)
    freqs = positions.float()[..., None] * inv_freq  # (..., dim/2)
    return torch.cat((freqs, freqs), dim=-1)  # (..., dim)


class InterleavedRoPE(nn.Module):
    """Rotary position embedding over a whole stage's hidden vector (one head).

    Pairs are adjacent features (x0, x1), (x2, x3), ... as in torchtune's RoPE, which the
    reference uses for ``pos_emb_type="rope"``. Input (..., S, D) with D even.
    """

    theta: torch.Tensor

    def __init__(self, dim: int, base: int = 10_000):
        super().__init__()
        theta = 1.0 / (base ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim))
        self.register_buffer("theta", theta, persistent=False)

    def forward(
        self, x: torch.Tensor, offset: int = 0, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rotate x (..., S, D) by positions ``offset ..``, or by ``positions`` broadcastable
        to (..., S) (e.g. (b, 1): one position per row)."""
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[-2], device=x.device)
        angles = positions.float()[..., None] * self.theta  # (..., S, D/2)
        cos, sin = angles.cos(), angles.sin()
        xf = x.float().unflatten(-1, (-1, 2))  # (..., S, D/2, 2)
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
        return out.flatten(-2).type_as(x)
