"""Numerical parity with the reference package (PyPI mblm 0.4.2).

The reference shares our import name, so it lives in its own venv (``make install-ref``):
``ref_export.py`` runs there, builds reference models, and exports weights, configs, inputs
and outputs; we convert the weights and compare logits and losses (fp32, CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mblm import Mamba1Block, MBLMReturnType, TransformerBlock
from mblm.cli import main as cli_main
from mblm.model.checkpoint import convert_reference_checkpoint, load_model

ROOT = Path(__file__).resolve().parents[2]
CASES = ["t1", "t2", "t3", "m1t"]


def ref_python() -> Path | None:
    path = Path(os.environ.get("MBLM_REF_PYTHON", ROOT / ".venv-ref" / "bin" / "python"))
    return path if path.exists() else None


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    python = ref_python()
    if python is None:
        if os.environ.get("MBLM_REQUIRE_REF") == "1":
            pytest.fail("reference venv missing: run `make install-ref`")
        pytest.skip("reference venv missing (`make install-ref`, or set MBLM_REF_PYTHON)")
    out = tmp_path_factory.mktemp("reference")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [str(python), str(Path(__file__).with_name("ref_export.py")), str(out)],
        cwd=out,  # not our repo: its `mblm` folder would shadow the reference package
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((out / f"{c}.pth").exists() for c in CASES), proc.stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_logits_and_losses_match_the_reference(exported, case):
    model = convert_reference_checkpoint(exported / f"{case}.pth", exported / f"{case}.yaml")
    model.eval()
    io = torch.load(exported / f"{case}.io.pt", weights_only=True)
    assert len(io["cases"]) == 3
    for c in io["cases"]:
        with torch.no_grad():
            torch.testing.assert_close(model(c["ids"], MBLMReturnType.LOGITS), c["logits"])
            torch.testing.assert_close(model(c["ids"], MBLMReturnType.LOSS), c["loss"])
            torch.testing.assert_close(
                model(c["ids"], MBLMReturnType.LOSS, loss_mask=c["mask"]), c["loss_masked"]
            )


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_generation_draws_the_same_bytes_as_the_reference(exported, case):
    """Same weights, same ``torch.manual_seed``: greedy and sampled bytes are the
    reference's, with our cache and without it."""
    model = convert_reference_checkpoint(exported / f"{case}.pth", exported / f"{case}.yaml")
    model.eval()
    io = torch.load(exported / f"{case}.io.pt", weights_only=True)
    assert len(io["generate"]) == 3
    for g in io["generate"]:
        for use_cache in (True, False):
            torch.manual_seed(g["seed"])
            out = model.generate(
                g["prime"],
                num_tokens_to_generate=20,
                enable_progress=False,
                use_cache=use_cache,
                **g["kwargs"],
            )
            assert torch.equal(out, g["out"]), (g["kwargs"], use_cache)


@pytest.mark.slow
def test_cases_cover_the_stage_blocks(exported):
    blocks = {
        case: [
            type(b)
            for b in convert_reference_checkpoint(
                exported / f"{case}.pth", exported / f"{case}.yaml"
            ).cfg.stage_blocks()
        ]
        for case in CASES
    }
    assert [len(b) for b in blocks.values()] == [1, 2, 3, 2]
    assert blocks["m1t"] == [Mamba1Block, TransformerBlock]


@pytest.mark.slow
def test_convert_reference_command_writes_a_loadable_model(exported, tmp_path):
    out = tmp_path / "t2.pt"
    assert (
        cli_main(
            [
                "convert-reference",
                str(exported / "t2.pth"),
                "--config",
                str(exported / "t2.yaml"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    model = load_model(out).eval()
    io = torch.load(exported / "t2.io.pt", weights_only=True)
    c = io["cases"][0]
    with torch.no_grad():
        torch.testing.assert_close(model(c["ids"], MBLMReturnType.LOGITS), c["logits"])


def test_convert_reference_command_reports_missing_files(tmp_path, capsys):
    code = cli_main(
        ["convert-reference", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "x.pt")]
    )
    assert code == 2
    assert "reference checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_mismatched_reference_checkpoint_is_a_clear_error(tmp_path):
    from tests.conftest import tiny_config

    cfg = tiny_config(stages=2)
    state = {"to_logits.weight": torch.zeros(257, 16), "bogus.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected key in a reference checkpoint: 'bogus"):
        convert_reference_checkpoint({"MODEL": state}, {"params": cfg.model_dump()})
    assert sys.modules["mblm"].__file__.startswith(str(ROOT))
