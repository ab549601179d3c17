"""Mamba-1 stage block through ``mambapy`` (pure PyTorch).

This is the architecture the reference package (mblm 0.4.2) silently fell back to when
``mamba-ssm`` was missing. Here it is only built when asked for by name
(``block_type: mamba1``), so old reference checkpoints keep loading; ``MambaBlock`` is
Mamba-2 on every machine.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from mblm.model.block import StageBlock


class Mamba1Block(StageBlock):
    """Mamba-1 (selective scan) stage block, state-dict compatible with mambapy's ``Mamba``."""

    block_type: Literal["mamba1"] = Field(
        description="Must be given explicitly: 'mamba1' (Mamba-2 is block_type 'mamba2')"
    )
    d_state: int = Field(gt=0, description="SSM state size")
    d_conv: int = Field(gt=0, description="Causal convolution width")
    expand: int = Field(gt=0, description="Expansion factor of the inner width")
    headdim: int | None = Field(
        default=None, description="Ignored (a Mamba-2 field kept for reference configs)"
    )
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Ignored by mambapy's Mamba-1")

    def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
        from mambapy.mamba import MambaConfig

        return mamba1_stage_class()(
            MambaConfig(
                d_model=model_dim,
                n_layers=num_layers,
                d_state=self.d_state,
                d_conv=self.d_conv,
                expand_factor=self.expand,
            )
        )


#: one layer's decoding cache, mambapy's layout: SSM state h (b, ED, N) and the last
#: d_conv - 1 convolution inputs (b, ED, d_conv - 1)
LayerState = tuple[torch.Tensor, torch.Tensor]


def mixer_prefill(mixer: Any, u: torch.Tensor) -> tuple[torch.Tensor, LayerState]:
    """A mambapy ``MambaBlock`` over u (b, l, D) -> (b, l, D) with the state after the last
    position (what mambapy's ``step`` continues from). The selective scan runs through
    mambapy's parallel ``pscan``, as in its forward, and its last state is kept."""
    from mambapy.pscan import pscan

    cfg = mixer.config
    seqlen = u.shape[1]
    x, z = mixer.in_proj(u).chunk(2, dim=-1)  # (b, l, ED) each
    conv_in = x.transpose(1, 2)  # (b, ED, l)
    conv_state = F.pad(conv_in, (cfg.d_conv - 1 - seqlen, 0))  # (b, ED, d_conv - 1)
    x = F.silu(mixer.conv1d(conv_in)[..., :seqlen].transpose(1, 2))  # (b, l, ED)

    A = -torch.exp(mixer.A_log.float())  # (ED, N)
    delta, B, C = torch.split(
        mixer.x_proj(x), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1
    )  # (b, l, dt_rank), (b, l, N), (b, l, N)
    delta, B, C = mixer._apply_layernorms(delta, B, C)
    delta = F.softplus(mixer.dt_proj(delta))  # (b, l, ED)
    decay = torch.exp(delta[..., None] * A)  # (b, l, ED, N)
    inputs = delta[..., None] * B[:, :, None] * x[..., None]  # (b, l, ED, N)
    hs = pscan(decay, inputs)  # (b, l, ED, N): the state after every position
    y = (hs @ C[..., None])[..., 0] + mixer.D.float() * x  # (b, l, ED)
    out = mixer.out_proj(y * F.silu(z))  # (b, l, D)
    return out, (hs[:, -1], conv_state)


@functools.cache
def mamba1_stage_class() -> type[torch.nn.Module]:
    """mambapy's ``Mamba`` with :meth:`prefill` and a one-position :meth:`step` for cached
    generation; parameters and state-dict keys unchanged. (Built on first use, so importing
    mblm does not import mambapy.)"""
    from mambapy.mamba import Mamba

    class Mamba1Stage(Mamba):
        """(N, S, D) -> (N, S, D), causal: mambapy's ``Mamba`` stack of Mamba-1 layers."""

        def prefill(self, x: torch.Tensor, max_len: int = 0) -> tuple[torch.Tensor, list]:
            """Forward over x (N, S, D) with the per-layer caches after the last position;
            ``max_len`` is unused (the state has a fixed size)."""
            states = []
            for layer in self.layers:
                out, state = mixer_prefill(layer.mixer, layer.norm(x))
                x = x + out
                states.append(state)
            return x, states

        def step(self, x: torch.Tensor, caches: list) -> tuple[torch.Tensor, list]:
            """One position: x (N, 1, D) -> (N, 1, D) and new caches (mambapy's layer step).

            Replaces mambapy's ``Mamba.step``, which takes (N, D) and edits ``caches``."""
            h = x[:, 0]
            new = []
            for layer, cache in zip(self.layers, caches, strict=True):
                h, cache = layer.step(h, cache)
                new.append(cache)
            return h[:, None], new

    return Mamba1Stage
