"""Typed, strict configuration of an MBLM model (the seed's ``MBLMModelConfig``)."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from mblm.model.block import StageBlock, StageBlockRegistry
from mblm.model.mamba import MambaBlock
from mblm.model.mamba1 import Mamba1Block
from mblm.model.transformer import TransformerBlock

block_registry = StageBlockRegistry()
block_registry.register()(TransformerBlock)
block_registry.register()(MambaBlock)
block_registry.register()(Mamba1Block)


class MBLMReturnType(str, Enum):
    """What ``MBLM.forward`` returns."""

    LOGITS = "logits"  # (B, L, V), or (B, P1, ..., Pn, V) for nested input
    LOSS = "loss"  # scalar
    LOSS_LOGITS = "loss_logits"  # (loss, logits)
    HIDDEN_STATE = "hidden_state"  # last stage's output, (B, L, D_n)


class MBLMModelConfig(BaseModel):
    """General config of an MBLM model. Lists go from the global (first) to the local stage."""

    model_config = ConfigDict(extra="forbid")

    num_tokens: int = Field(gt=0, description="Vocabulary size (257 for bytes plus a pad id)")
    pad_token_id: int = Field(description="Id used for padding; ignored by the loss")
    hidden_dims: list[int] = Field(description="Model width at each stage")
    num_layers: list[int] = Field(description="Number of layers at each stage")
    seq_lens: list[int] = Field(description="Sequence (patch) length at each stage")
    train_checkpoint_chunks: list[int] | None = Field(
        default=None,
        description="Activation-checkpoint chunks for stages 2..n while training (None: off)",
    )
    block: SerializeAsAny[StageBlock] | list[SerializeAsAny[StageBlock]] = Field(
        description="One stage block for all stages, or one per stage"
    )

    @field_validator("block", mode="before")
    @classmethod
    def _parse_block(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(block_registry.parse(item))
                except ValueError as err:
                    raise ValueError(f"block[{i}]: {err}") from None
            return out
        return block_registry.parse(value)

    @model_validator(mode="after")
    def _check(self) -> MBLMModelConfig:
        n = len(self.hidden_dims)
        if n == 0:
            raise ValueError("hidden_dims must name at least one stage, got []")
        for name in ("num_layers", "seq_lens"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries but hidden_dims has {n}: "
                    f"{name}={getattr(self, name)}, hidden_dims={self.hidden_dims}"
                )
        for name in ("hidden_dims", "num_layers", "seq_lens"):
            for i, v in enumerate(getattr(self, name)):
                if v <= 0:
                    raise ValueError(f"{name}[{i}] must be positive, got {v}")
        if not 0 <= self.pad_token_id < self.num_tokens:
            raise ValueError(
                f"pad_token_id must be in [0, num_tokens={self.num_tokens}), "
                f"got {self.pad_token_id}"
            )
        chunks = self.train_checkpoint_chunks
        if chunks is not None:
            if len(chunks) != n - 1:
                raise ValueError(
                    f"train_checkpoint_chunks needs one entry per inner stage ({n - 1}), "
                    f"got {chunks}"
                )
            for i, c in enumerate(chunks):
                if c <= 0:
                    raise ValueError(f"train_checkpoint_chunks[{i}] must be positive, got {c}")
        if isinstance(self.block, list) and len(self.block) != n:
            raise ValueError(f"block lists {len(self.block)} blocks but the model has {n} stages")
        for i, (blk, dim, seq) in enumerate(
            zip(self.stage_blocks(), self.hidden_dims, self.seq_lens, strict=True)
        ):
            try:
                blk.check_stage(dim, seq)
            except ValueError as err:
                raise ValueError(f"block[{i}] ({blk.block_type}): {err}") from None
        return self

    def stage_blocks(self) -> list[StageBlock]:
        """The block of every stage, global to local."""
        if isinstance(self.block, list):
            return list(self.block)
        return [self.block] * len(self.hidden_dims)

    @property
    def num_stages(self) -> int:
        return len(self.hidden_dims)

    @property
    def max_seq_len(self) -> int:
        """The longest flat input the model accepts: the product of ``seq_lens``."""
        return math.prod(self.seq_lens)
