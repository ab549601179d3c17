"""Sweep files and search spaces: checked before any trial starts (no Ray here)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from mblm.cli import main as cli_main
from mblm.tune.config import Factorizations, load_sweep_config
from mblm.tune.space import architectures, count_architectures, factorizations, load_base

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_has_valid_architectures(path):
    sweep = load_sweep_config(path)
    base = load_base(sweep)
    space = architectures(sweep, base)
    assert space.candidates
    assert len({repr(c.overrides) for c in space.candidates}) == len(space.candidates)
    for c in space.candidates:  # every candidate is a runnable training config
        assert c.config["params"]["input_seq_len"] <= math.prod(c.config["params"]["seq_lens"])
        if sweep.limits.max_params:
            assert c.num_params <= sweep.limits.max_params


def test_debug_sweep_skips_the_invalid_patch_layout():
    sweep = load_sweep_config(ROOT / "configs" / "sweeps" / "debug.yaml")
    base = load_base(sweep)
    space = architectures(sweep, base)
    assert count_architectures(sweep, base) == 8
    assert len(space.candidates) == 4 and space.skipped == 4
    assert all(c.overrides["params.seq_lens"] == [16, 8] for c in space.candidates)
    assert {c.overrides["train.learning_rate"] for c in space.candidates} == {3e-3, 1e-6}
    (reason,) = space.reasons
    assert "exceeds the model's context prod(seq_lens)=64" in reason


def test_factorizations_are_all_ordered_products():
    got = factorizations(Factorizations(stages=[2, 3], min_patch=2), 64)
    assert all(math.prod(f) == 64 and min(f) >= 2 for f in got)
    assert [2, 32] in got and [32, 2] in got and [4, 4, 4] in got and [2, 2, 16] in got
    assert len(got) == len({tuple(f) for f in got}) == 5 + 10  # 5 pairs, 10 triples
    bounded = factorizations(Factorizations(stages=[2], min_patch=4, max_patch=16), 64)
    assert bounded == [[4, 16], [8, 8], [16, 4]]


def test_per_stage_choices_follow_the_number_of_stages(tmp_path):
    sweep_file = _sweep(
        tmp_path,
        space={
            "params.seq_lens": {"choice": [[16, 8], [4, 4, 8]]},
            "params.hidden_dims": {"per_stage": [16, 32]},
            "params.num_layers": {"per_stage": [1]},
            "params.block": {"per_stage": ["transformer"]},
        },
    )
    sweep = load_sweep_config(sweep_file)
    base = load_base(sweep)
    assert count_architectures(sweep, base) == 4 + 8
    space = architectures(sweep, base)
    assert len(space.candidates) == 12 and space.skipped == 0
    three = [c for c in space.candidates if len(c.config["params"]["seq_lens"]) == 3]
    assert len(three) == 8 and all(len(c.config["params"]["hidden_dims"]) == 3 for c in three)


def test_limits_filter_architectures(tmp_path):
    sweep_file = _sweep(
        tmp_path,
        space={"params.hidden_dims": [[32, 16], [256, 128]]},
        limits={"max_params": 100_000},
    )
    sweep = load_sweep_config(sweep_file)
    space = architectures(sweep, load_base(sweep))
    assert [c.config["params"]["hidden_dims"] for c in space.candidates] == [[32, 16]]
    assert space.skipped == 1 and "over limits.max_params=100,000" in next(iter(space.reasons))


def test_set_reaches_the_sweep_or_the_base_config():
    path = ROOT / "configs" / "sweeps" / "debug.yaml"
    sweep = load_sweep_config(
        path,
        [
            "search.seed=7",
            "ray.storage_path=s3://bucket/runs",
            "io.output_dir=/x",
            "space.train.learning_rate=[0.01]",
        ],
    )
    assert sweep.search.seed == 7
    assert sweep.space["train.learning_rate"].choice == [0.01]
    base = load_base(sweep)
    assert base["ray"]["storage_path"] == "s3://bucket/runs" and base["io"]["output_dir"] == "/x"


def _sweep(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "sweeps" / "debug.yaml").read_text())
    data["base"] = str(ROOT / "configs" / "debug.yaml")
    data["set"] = [*data["set"], f"io.output_dir={tmp_path / 'out'}"]
    data.update(changes)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"space": {"params.seq_lens": [[4, 4], [8, 8]]}},
            r"has no valid architecture \(2 combinations tried, all invalid: 1 x params: "
            r"input_seq_len=128 exceeds the model's context prod\(seq_lens\)=16; 1 x",
        ),
        (
            {"space": {"params.nope": [1, 2]}},
            r"space\.params\.nope: unknown parameter path \(params has .*seq_lens",
        ),
        ({"space": {"model.depth": [1]}}, r"space\.model\.depth: unknown parameter path; use"),
        ({"base": "/nonexistent/train.yaml"}, r"base: training config not found"),
        (
            {"space": {"train.learning_rate": {"loguniform": [1e-4, 1e-2]}}},
            r"grid search needs a list of choices",
        ),
        ({"space": {"params.block": ["lstm"]}}, r"block 'lstm' is not defined"),
        ({"search": {"algorithm": "bayes"}}, r"search\.algorithm: Input should be"),
    ],
)
def test_bad_sweeps_fail_in_one_line_before_any_trial(tmp_path, capsys, changes, message):
    sweep_file = _sweep(tmp_path, **changes)
    assert cli_main(["tune", str(sweep_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mblm tune: error:"), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # no sweep folder, no MLflow store, no run


def test_missing_sweep_file(capsys):
    assert cli_main(["tune", "/nonexistent/sweep.yaml"]) == 2
    assert "sweep file not found: /nonexistent/sweep.yaml" in capsys.readouterr().err
