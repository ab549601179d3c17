"""Transformer decoder stage block (MEGABYTE's decoder, numerically).

Each layer is pre-norm attention then pre-norm feed-forward, both reading a token-shifted
copy of the residual stream; rotary embeddings on queries and keys (optional); a final
RMSNorm. Attention runs through ``F.scaled_dot_product_attention`` so PyTorch dispatches to
flash / memory-efficient kernels wherever the device has them.

Cached decoding (``TransformerDecoder.prefill`` / ``step``, used by ``mblm.model.decode``)
keeps per layer the keys and values of every position so far in a buffer of the stage's
maximum length, and the residual stream of the previous position before attention and
before the feed-forward (what the token shift reads). Rows may be at different positions.
"""

from __future__ import annotations

from typing import Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from mblm.model.block import StageBlock
from mblm.model.layers import RMSNorm, rotary_angles, rotate_half, shift_after, token_shift

#: cos and sin of the rotary angles: (s, e) over a sequence, (n, 1, 1, e) one per row
Rotary = tuple[torch.Tensor, torch.Tensor]
#: one layer's decoding cache: key and value buffers (n, h, max_len, e), and the residual
#: stream at the previous position before attention and before the feed-forward (n, D)
LayerCache = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
#: a Transformer stage's decoding state: positions filled per row (n,), the layers' caches
DecoderCache = tuple[torch.Tensor, list[LayerCache]]


class TransformerBlock(StageBlock):
    """A causal Transformer decoder at an MBLM stage."""

    attn_head_dims: int = Field(gt=0, description="Width of one attention head")
    attn_num_heads: int = Field(gt=0, description="Number of attention heads")
    attn_use_rot_embs: bool = Field(description="Rotary embeddings on queries and keys")
    attn_dropout: float = Field(default=0.0, ge=0, lt=1, description="Attention dropout")
    ff_multiplier: int = Field(default=2, gt=0, description="Feed-forward width / model width")
    ff_dropout: float = Field(default=0.0, ge=0, lt=1, description="Feed-forward dropout")
    use_flash_attn: bool = Field(
        default=False,
        description="Kept for seed configs: SDPA picks flash kernels wherever available",
    )
    block_type: Literal["transformer"] = Field(default="transformer", description="Registry name")

    def check_stage(self, model_dim: int, seq_len: int) -> None:
        super().check_stage(model_dim, seq_len)
        if self.attn_use_rot_embs and self.attn_head_dims % 2:
            raise ValueError(
                f"attn_use_rot_embs=True needs an even attn_head_dims, got {self.attn_head_dims}"
            )

    @classmethod
    def convert_reference_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MEGABYTE layout (separate to_q / to_kv, Sequential feed-forward) -> ours."""
        names = {
            "0.norm.g": "attn.norm.weight",
            "0.to_out.weight": "attn.out.weight",
            "1.0.g": "ff.norm.weight",
            "1.1.weight": "ff.up.weight",
            "1.1.bias": "ff.up.bias",
            "1.4.weight": "ff.down.weight",
            "1.4.bias": "ff.down.bias",
        }
        out: dict[str, torch.Tensor] = {}
        for key, value in state.items():
            if key == "rotary_emb.inv_freq":
                continue  # recomputed, not a parameter
            if key == "norm.g":
                out["norm.weight"] = value
                continue
            layer, _, rest = key.removeprefix("layers.").partition(".")
            if not key.startswith("layers.") or rest in ("0.to_q.weight", "0.to_kv.weight"):
                if rest == "0.to_q.weight":
                    kv = state[f"layers.{layer}.0.to_kv.weight"]
                    out[f"layers.{layer}.attn.qkv.weight"] = torch.cat((value, kv), dim=0)
                elif rest != "0.to_kv.weight":
                    raise ValueError(f"unexpected key in a reference Transformer stage: {key!r}")
                continue
            if rest not in names:
                raise ValueError(f"unexpected key in a reference Transformer stage: {key!r}")
            out[f"layers.{layer}.{names[rest]}"] = value
        return out

    def to_model(self, model_dim: int, num_layers: int) -> nn.Module:
        return TransformerDecoder(
            model_dim=model_dim,
            num_layers=num_layers,
            head_dim=self.attn_head_dims,
            num_heads=self.attn_num_heads,
            use_rotary=self.attn_use_rot_embs,
            attn_dropout=self.attn_dropout,
            ff_mult=self.ff_multiplier,
            ff_dropout=self.ff_dropout,
        )


def explicit_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float
) -> torch.Tensor:
    """softmax(q k^T / sqrt(e) + causal mask) v, spelled out. (n, h, s, e) -> (n, h, s, e)"""
    s = q.shape[-2]
    future = torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1)  # (s, s)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (n, h, s, s)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    return F.dropout(weights, p=dropout) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, head_dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.inner = head_dim * num_heads
        self.dropout = dropout
        self.norm = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * self.inner, bias=False)
        self.out = nn.Linear(self.inner, dim, bias=False)

    def project(
        self, x: torch.Tensor, rotary: Rotary | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys and values, rotated: (n, s, D) -> 3 x (n, h, s, e)."""
        qkv = self.qkv(self.norm(x))  # (n, s, 3 * h * e)
        q, k, v = rearrange(qkv, "n s (t h e) -> t n h s e", t=3, h=self.num_heads)
        if rotary is not None:
            cos, sin = rotary  # (s, e), or (n, 1, 1, e) when decoding
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        return q, k, v

    def forward(self, x: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        q, k, v = self.project(x, rotary)
        dropout = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.shape[-2] <= 64 and torch.compiler.is_compiling():
            # explicit form: Inductor fuses it, and beats the CPU SDPA kernel on short sequences
            y = explicit_causal_attention(q, k, v, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        return self.out(rearrange(y, "n h s e -> n s (h e)"))

    def prefill(
        self, x: torch.Tensor, rotary: Rotary | None, max_len: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention over x (n, s, D), also returning key and value buffers (n, h, max_len, e)
        holding the s positions."""
        q, k, v = self.project(x, rotary)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (n, h, s, e)
        k_buf = k.new_zeros(*k.shape[:2], max_len, k.shape[-1])  # (n, h, max_len, e)
        v_buf = torch.zeros_like(k_buf)
        k_buf[:, :, : k.shape[2]] = k
        v_buf[:, :, : v.shape[2]] = v
        return self.out(rearrange(y, "n h s e -> n s (h e)")), k_buf, v_buf

    def step(
        self,
        x: torch.Tensor,
        rotary: Rotary | None,
        k_buf: torch.Tensor,
        v_buf: torch.Tensor,
        pos: torch.Tensor,
        seen: torch.Tensor,
    ) -> torch.Tensor:
        """One position per row: x (n, 1, D) at positions ``pos`` (n,). Writes its key and
        value into the buffers (in place) and attends to the positions ``seen`` (n, 1, 1,
        max_len) marks."""
        q, k, v = self.project(x, rotary)  # (n, h, 1, e)
        rows = torch.arange(x.shape[0], device=x.device)
        k_buf[rows, :, pos] = k[:, :, 0]
        v_buf[rows, :, pos] = v[:, :, 0]
        y = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=seen)  # (n, h, 1, e)
        return self.out(rearrange(y, "n h s e -> n s (h e)"))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.up = nn.Linear(dim, dim * mult)
        self.down = nn.Linear(dim * mult, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.gelu(self.up(self.norm(x)))))


class DecoderLayer(nn.Module):
    def __init__(
        self,
        dim: int,
        head_dim: int,
        num_heads: int,
        attn_dropout: float,
        ff_mult: int,
        ff_dropout: float,
    ):
        super().__init__()
        self.attn = CausalSelfAttention(dim, head_dim, num_heads, attn_dropout)
        self.ff = FeedForward(dim, ff_mult, ff_dropout)

    def forward(self, x: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
        # both branches read a token-shifted copy; the residual stream itself is not shifted
        x = x + self.attn(token_shift(x), rotary)
        return x + self.ff(token_shift(x))

    def prefill(
        self, x: torch.Tensor, rotary: Rotary | None, max_len: int
    ) -> tuple[torch.Tensor, LayerCache]:
        attn, k_buf, v_buf = self.attn.prefill(token_shift(x), rotary, max_len)
        h = x + attn
        out = h + self.ff(token_shift(h))
        return out, (k_buf, v_buf, x[:, -1], h[:, -1])

    def step(
        self,
        x: torch.Tensor,
        rotary: Rotary | None,
        pos: torch.Tensor,
        seen: torch.Tensor,
        cache: LayerCache,
    ) -> tuple[torch.Tensor, LayerCache]:
        k_buf, v_buf, prev_x, prev_h = cache
        h = x + self.attn.step(shift_after(x, prev_x), rotary, k_buf, v_buf, pos, seen)
        out = h + self.ff(shift_after(h, prev_h))
        return out, (k_buf, v_buf, x[:, 0], h[:, 0])


class TransformerDecoder(nn.Module):
    """(N, S, D) -> (N, S, D), causal."""

    def __init__(
        self,
        *,
        model_dim: int,
        num_layers: int,
        head_dim: int,
        num_heads: int,
        use_rotary: bool,
        attn_dropout: float = 0.0,
        ff_mult: int = 2,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        self.head_dim = head_dim
        self.use_rotary = use_rotary
        self.layers = nn.ModuleList(
            DecoderLayer(model_dim, head_dim, num_heads, attn_dropout, ff_mult, ff_dropout)
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(model_dim)

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> Rotary | None:
        """cos and sin for positions 0..s-1 (s, e), or per row (n, 1, 1, e) at ``positions``."""
        if not self.use_rotary:
            return None
        angles = rotary_angles(x.shape[-2], self.head_dim, x.device, positions=positions)
        if positions is not None:
            angles = angles[:, None, None]  # (n, 1, 1, e): broadcasts over heads
        return angles.cos().to(x.dtype), angles.sin().to(x.dtype)

    def _layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rotary = self._rotary(x)
        for layer in self.layers:
            x = layer(x, rotary)
        return self.norm(x)

    def prefill(self, x: torch.Tensor, max_len: int) -> tuple[torch.Tensor, DecoderCache]:
        """Forward over x (n, s, D) (s <= max_len), returning the cache for :meth:`step`."""
        rotary = self._rotary(x)
        caches = []
        for layer in self._layers():
            x, cache = layer.prefill(x, rotary, max_len)
            caches.append(cache)
        pos = torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
        return self.norm(x), (pos, caches)

    def step(self, x: torch.Tensor, state: DecoderCache) -> tuple[torch.Tensor, DecoderCache]:
        """One new position per row: x (n, 1, D) -> (n, 1, D). The key/value buffers are
        updated in place; the returned state holds them and the advanced positions."""
        pos, caches = state
        rotary = self._rotary(x, positions=pos)
        max_len = caches[0][0].shape[2]
        seen = torch.arange(max_len, device=x.device) <= pos[:, None]  # (n, max_len)
        seen = seen[:, None, None]  # (n, 1, 1, max_len)
        new_caches = []
        for layer, cache in zip(self._layers(), caches, strict=True):
            x, cache = layer.step(x, rotary, pos, seen, cache)
            new_caches.append(cache)
        return self.norm(x), (pos + 1, new_caches)
