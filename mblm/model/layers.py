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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_angles(seq_len: int, dim: int, device: torch.device, offset: int = 0) -> torch.Tensor:
    """Angles for rotary attention in the half-split layout: (S, dim), theta 10,000."""
    inv_freq = 1.0 / (10_000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (S, dim/2)
    return torch.cat((freqs, freqs), dim=-1)  # (S, dim)


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

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq_len = x.shape[-2]
        pos = torch.arange(offset, offset + seq_len, device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.theta)  # (S, D/2)
        cos, sin = angles.cos(), angles.sin()
        xf = x.float().unflatten(-1, (-1, 2))  # (..., S, D/2, 2)
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1)
        return out.flatten(-2).type_as(x)
