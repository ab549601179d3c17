"""Shared tiny model configs: one per registered block, so a new block is tested too."""

from __future__ import annotations

import pytest
import torch

from mblm import MBLM, MBLMModelConfig, block_registry

# tiny field values for each built-in block; a block registered without an entry here fails
# test_every_registered_block_has_a_tiny_config
TINY_BLOCKS: dict[str, dict] = {
    "transformer": {"attn_head_dims": 8, "attn_num_heads": 2, "attn_use_rot_embs": True},
    "mamba2": {"d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8},
    "mamba1": {"d_state": 8, "d_conv": 4, "expand": 2},
}


def tiny_config(block_type: str = "transformer", stages: int = 2, **overrides) -> MBLMModelConfig:
    dims = [32, 24, 16][-stages:]
    lens = {1: [24], 2: [6, 4], 3: [6, 4, 3]}[stages]
    block = {"block_type": block_type, **TINY_BLOCKS[block_type]}
    data = dict(
        num_tokens=257,
        pad_token_id=256,
        hidden_dims=dims,
        seq_lens=lens,
        num_layers=[1] * stages,
        block=block,
    )
    data.update(overrides)
    return MBLMModelConfig.model_validate(data)


def tiny_model(block_type: str = "transformer", stages: int = 2, seed: int = 0, **kw) -> MBLM:
    torch.manual_seed(seed)
    return MBLM(tiny_config(block_type, stages, **kw)).eval()


BUILT_IN = sorted(
    n for cls in block_registry if cls.__module__.startswith("mblm.") for n in cls.type_names()
)


@pytest.fixture(params=BUILT_IN)
def block_type(request) -> str:
    return request.param
