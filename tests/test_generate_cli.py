"""``mblm generate`` and ``jobs/generate.py`` end to end, in subprocesses: a model file, an
MLflow run (a real sqlite store), and the one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mblm.model.checkpoint import save_model
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hé, "


def run_cli(*args: str, entry: str = "cli", env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mblm.cli", "generate"]
    if entry == "job":
        cmd = [sys.executable, str(ROOT / "jobs" / "generate.py")]
    full_env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    full_env.update(env or {})
    return subprocess.run(
        [*cmd, *args], capture_output=True, text=True, cwd=ROOT, env=full_env, timeout=300
    )


def expected_text(model, **kw) -> str:
    prime = torch.tensor(list(PROMPT.encode()))
    out = model.generate(prime, enable_progress=False, **kw)
    return bytes(out[len(prime) :].tolist()).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> tuple[Path, object]:
    model = tiny_model(stages=3)  # context 72 bytes, patches of 12 and 3
    path = save_model(model, tmp_path_factory.mktemp("model") / "model.pt")
    return path, model


def test_generate_streams_the_models_bytes_from_a_model_file(model_file):
    path, model = model_file
    sampling = ["--seed", "7", "--top-k", "50", "--top-p", "0.95", "--temperature", "0.9"]
    sampled = run_cli("--checkpoint", str(path), "--prompt", PROMPT, "--max-bytes", "40", *sampling)
    assert sampled.returncode == 0, sampled.stderr
    want = expected_text(
        model, num_tokens_to_generate=40, seed=7, top_k=50, top_p=0.95, temperature=0.9
    )
    assert sampled.stdout == want
    # greedy by default, the whole context; the same without the cache and through jobs/
    greedy = run_cli("--checkpoint", str(path), "--prompt", PROMPT)
    uncached = run_cli("--checkpoint", str(path), "--prompt", PROMPT, "--no-cache", entry="job")
    assert greedy.returncode == 0 and uncached.returncode == 0, greedy.stderr + uncached.stderr
    assert greedy.stdout == uncached.stdout == expected_text(model)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "missing.pt"], "model file not found: missing.pt"),
        (["--prompt", "x" * 72], "the prompt is 72 bytes: the model's context is 72 bytes"),
        (["--max-bytes", "99"], "cannot generate 99 bytes after a 4-byte prompt"),
        (["--top-p", "1.5"], r"top_p must be in (0, 1]"),
    ],
)
def test_bad_requests_are_one_line_errors(model_file, args, message):
    path, _ = model_file
    base = ["--checkpoint", str(path), "--prompt", "abcd"]
    proc = run_cli(*base, *args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mblm generate: error: ")
    assert message in lines[0]


@pytest.mark.slow
def test_generate_from_an_mlflow_run(model_file, tmp_path):
    from mlflow.tracking import MlflowClient

    path, model = model_file
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("gen", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifact(run.info.run_id, str(path))  # as training logs it: model.pt
    client.set_terminated(run.info.run_id)
    want = expected_text(model, num_tokens_to_generate=20)

    common = ["--max-bytes", "20", "--prompt", PROMPT]
    by_id = run_cli("--checkpoint", run.info.run_id, "--tracking-uri", uri, *common)
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == want
    run_uri = f"runs:/{run.info.run_id}/model.pt"
    by_uri = run_cli("--checkpoint", run_uri, *common, env={"MLFLOW_TRACKING_URI": uri})
    assert by_uri.returncode == 0, by_uri.stderr
    assert by_uri.stdout == want

    unknown = run_cli("--checkpoint", "0" * 32, "--tracking-uri", uri)
    assert unknown.returncode == 2
    lines = unknown.stderr.strip().splitlines()
    assert len(lines) == 1 and f"run {'0' * 32} in {uri}" in lines[0], unknown.stderr
