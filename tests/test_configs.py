"""Every shipped config validates, and its dataset and model fit together."""

from pathlib import Path

import pytest
import torch

from mblm import MBLM
from mblm.data.corpus import open_corpus
from mblm.data.registry import dataset_registry
from mblm.data.types import ModelMode
from mblm.train.config import load_train_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_configs_exist():
    assert {p.name for p in CONFIGS} >= {
        "debug.yaml",
        "quickstart.yaml",
        "paper_8k_mamba_mamba.yaml",
        "paper_8k_mamba_transformer.yaml",
        "paper_1m_3stage.yaml",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validates_and_builds(path):
    cfg = load_train_config(path)
    assert dataset_registry.is_built_in(cfg.io.dataset_id)
    with torch.device("meta"):  # shapes only: the paper's models have 360M parameters
        model = MBLM(cfg.params.model_config_only())
    assert model.max_seq_len >= cfg.params.input_seq_len
    if path.name.startswith("paper_"):  # the paper's 360M-parameter models, on GPUs
        assert 3.5e8 < sum(p.numel() for p in model.parameters()) < 3.7e8
        assert cfg.ray.use_gpu and cfg.io.dataset_id == "pg19"
    if cfg.io.dataset_id == "stdlib":
        corpus = open_corpus(
            "stdlib", cfg.io.dataset_dir, cfg.params.input_seq_len, ModelMode.VALID
        )
        assert corpus.num_windows >= cfg.ray.num_workers
