"""``mblm evaluate``: a model file on a split of a config's corpus, read by a real Ray Data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mblm.cli import main as cli_main
from mblm.model.checkpoint import save_model
from mblm.model.mblm import MBLM
from mblm.train.config import load_train_config

DEBUG = Path(__file__).resolve().parents[2] / "configs" / "debug.yaml"


@pytest.mark.slow
def test_evaluate_a_model_file_on_the_validation_split(tmp_path, capsys, monkeypatch):
    import ray
    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    torch.manual_seed(0)
    model = MBLM(load_train_config(DEBUG).params.model_config_only())
    path = save_model(model, tmp_path / "model.pt")
    try:
        code = cli_main(
            ["evaluate", str(DEBUG), "--checkpoint", str(path), "--split", "valid",
             "--max-windows", "12", "--batch-size", "5"]
        )  # fmt: skip
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert code == 0, out
    m = re.search(r"valid: (\d+\.\d+) bits/byte \(loss (\d+\.\d+)\) over 12 windows of 128", out)
    assert m, out
    # an untrained model is about as unsure as a uniform guess over 257 ids: log2(257) = 8.0
    assert 7.0 < float(m.group(1)) < 9.5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "/nonexistent/model.pt"], "model file not found: /nonexistent/model.pt"),
        (["--checkpoint", "x", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--checkpoint", "x", "--set", "io.dataset_id=nosuch"], "unknown dataset 'nosuch'"),
    ],
)
def test_evaluate_bad_input_is_one_line(capsys, args, message):
    assert cli_main(["evaluate", str(DEBUG), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
