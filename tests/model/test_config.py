import json

import pytest
import torch
import yaml
from pydantic import ValidationError

from mblm import (
    MBLM,
    Mamba1Block,
    MambaBlock,
    MBLMModelConfig,
    StageBlock,
    TransformerBlock,
    block_registry,
)
from mblm.model.block import StageBlockRegistry
from tests.conftest import TINY_BLOCKS, tiny_config

T_FIELDS = {"attn_head_dims": 8, "attn_num_heads": 2, "attn_use_rot_embs": True}
M_FIELDS = {"d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8}


def test_every_built_in_block_has_a_tiny_config():
    names = {
        n for cls in block_registry if cls.__module__.startswith("mblm.") for n in cls.type_names()
    }
    assert names == set(TINY_BLOCKS)


def test_parse_without_block_type_is_deterministic():
    assert type(block_registry.parse(T_FIELDS)) is TransformerBlock
    # Mamba fields mean Mamba-2 on every machine; Mamba-1 only when named
    assert type(block_registry.parse(M_FIELDS)) is MambaBlock
    assert type(block_registry.parse({**M_FIELDS, "block_type": "mamba1"})) is Mamba1Block


def test_explicit_block_type_picks_the_class():
    blk = block_registry.parse({**T_FIELDS, "block_type": "transformer", "pos_emb_type": "rope"})
    assert isinstance(blk, TransformerBlock) and blk.pos_emb_type == "rope"


def test_unknown_block_type_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"unknown block_type 'lstmx'.*mamba1, mamba2"):
        block_registry.parse({"block_type": "lstmx"})


def test_no_match_and_ambiguity_are_errors():
    with pytest.raises(ValueError, match="match no registered block"):
        block_registry.parse({"attn_head_dims": 8})
    reg = StageBlockRegistry()

    class A(StageBlock):
        block_type: str = "a"
        width: int = 1

        def to_model(self, model_dim, num_layers):
            return torch.nn.Identity()

    class B(StageBlock):
        block_type: str = "b"
        width: int = 2

        def to_model(self, model_dim, num_layers):
            return torch.nn.Identity()

    reg.register()(A)
    reg.register()(B)
    with pytest.raises(ValueError, match=r"match several blocks: A \('a'\), B \('b'\)"):
        reg.parse({"width": 3})
    assert isinstance(reg.parse({"width": 3, "block_type": "b"}), B)


def test_registering_a_name_twice_with_another_class_fails():
    reg = StageBlockRegistry()
    reg.register()(TransformerBlock)

    class Other(StageBlock):
        block_type: str = "transformer"

        def to_model(self, model_dim, num_layers):
            return torch.nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        reg.register()(Other)


def test_unknown_field_is_rejected():
    with pytest.raises(ValidationError, match="attn_heads"):
        TransformerBlock(**T_FIELDS, attn_heads=4)
    with pytest.raises(ValidationError, match="hidden_dim"):
        MBLMModelConfig.model_validate({**tiny_config().model_dump(), "hidden_dim": [1]})


@pytest.mark.parametrize("block_type", sorted(TINY_BLOCKS))
def test_round_trip_dict_json_yaml(block_type):
    cfg = tiny_config(block_type, stages=3, train_checkpoint_chunks=[2, 3])
    assert MBLMModelConfig.model_validate(cfg.model_dump()) == cfg
    assert MBLMModelConfig.model_validate_json(cfg.model_dump_json()) == cfg
    text = yaml.safe_dump(cfg.model_dump(mode="json"))
    again = MBLMModelConfig.model_validate(yaml.safe_load(text))
    assert again == cfg
    assert json.loads(again.model_dump_json())["block"]["block_type"] == block_type


def test_block_list_round_trip_keeps_each_class():
    cfg = tiny_config(block=[{**M_FIELDS}, {**T_FIELDS, "pos_emb_type": "fixed"}])
    assert [type(b) for b in cfg.stage_blocks()] == [MambaBlock, TransformerBlock]
    again = MBLMModelConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump())))
    assert [type(b) for b in again.stage_blocks()] == [MambaBlock, TransformerBlock]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"num_layers": [1]}, r"num_layers has 1 entries but hidden_dims has 2"),
        ({"seq_lens": [4, 0]}, r"seq_lens\[1\] must be positive, got 0"),
        ({"hidden_dims": [32, -16]}, r"hidden_dims\[1\] must be positive, got -16"),
        ({"pad_token_id": 257}, r"pad_token_id must be in \[0, num_tokens=257\), got 257"),
        ({"train_checkpoint_chunks": [1, 2]}, r"train_checkpoint_chunks needs one entry"),
        ({"train_checkpoint_chunks": [0]}, r"train_checkpoint_chunks\[0\] must be positive"),
        ({"hidden_dims": []}, r"at least one stage"),
        ({"num_tokens": 0}, r"num_tokens"),
        (
            {"block": [{"block_type": "transformer", **T_FIELDS}]},
            r"block lists 1 blocks but the model has 2 stages",
        ),
        (
            {"block": {**M_FIELDS, "headdim": 7}},
            r"block\[0\] \(mamba2\): headdim=7 does not divide",
        ),
        (
            {"block": {**T_FIELDS, "attn_head_dims": 7}},
            r"attn_use_rot_embs=True needs an even attn_head_dims, got 7",
        ),
        ({"block": {**T_FIELDS, "attn_num_heads": 0}}, r"attn_num_heads"),
        ({"block": {**T_FIELDS, "pos_emb_type": "learned"}}, r"pos_emb_type"),
        ({"block": [{**T_FIELDS}, {"d_state": 8}]}, r"block\[1\]: fields \['d_state'\]"),
    ],
)
def test_bad_configs_name_field_and_value(override, message):
    with pytest.raises(ValidationError, match=message):
        tiny_config(**override)


def test_default_checkpoint_chunks_and_derived_values():
    cfg = tiny_config(stages=3)
    assert cfg.train_checkpoint_chunks is None
    assert cfg.num_stages == 3 and cfg.max_seq_len == 6 * 4 * 3
    assert MBLM(cfg).max_seq_len == 72
