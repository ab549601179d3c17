"""Mamba-1 stage block through ``mambapy`` (pure PyTorch).

This is the architecture the reference package (mblm 0.4.2) silently fell back to when
``mamba-ssm`` was missing. Here it is only built when asked for by name
(``block_type: mamba1``), so old reference checkpoints keep loading; ``MambaBlock`` is
Mamba-2 on every machine.
"""

from __future__ import annotations

from typing import Literal

import torch
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
        from mambapy.mamba import Mamba, MambaConfig

        return Mamba(
            MambaConfig(
                d_model=model_dim,
                n_layers=num_layers,
                d_state=self.d_state,
                d_conv=self.d_conv,
                expand_factor=self.expand,
            )
        )
