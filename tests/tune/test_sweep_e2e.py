"""Sweeps on real components on 127.0.0.1: a Ray head started with ``ray start``, a job sent
with ``ray job submit``, an ``mlflow server`` receiving the runs over HTTP. No mocks.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEBUG_SWEEP = ROOT / "configs" / "sweeps" / "debug.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PYTHONPATH")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in jobs is ours
    env["RAY_AUTH_MODE"] = "disabled"  # explicit: see README, "Ray's auth mode"
    return env


def _wait_http(url: str, proc: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 400:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} did not answer in {seconds} s"
        time.sleep(0.5)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (``ray start --block`` stops its head on SIGTERM)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_sweep_job_on_a_real_head_logs_to_a_real_mlflow_server(tmp_path):
    from mlflow.tracking import MlflowClient

    from mblm.cli import main as cli_main
    from mblm.train.config import load_train_config

    env = _env()
    mlflow_port, gcs_port, dash_port = _free_port(), _free_port(), _free_port()
    uri = f"http://127.0.0.1:{mlflow_port}"
    store = tmp_path / "mlflow.db"
    server_log = (tmp_path / "mlflow.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store}",
         "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    head_log = (tmp_path / "head.log").open("w")
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port),
         "--num-cpus", "2", "--disable-usage-stats"],
        stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=tmp_path,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        _wait_http(f"{uri}/health", server, tmp_path / "mlflow.log")
        _wait_http(f"http://127.0.0.1:{dash_port}/api/version", head, tmp_path / "head.log")
        for _ in range(20):  # the dashboard answers before its job agent is ready
            job = subprocess.run(
                [str(BIN / "ray"), "job", "submit",
                 "--address", f"http://127.0.0.1:{dash_port}",
                 "--working-dir", str(ROOT),
                 "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"),
                 "--", "python", "jobs/tune.py", "configs/sweeps/debug.yaml",
                 "--set", f"io.output_dir={out}", "--set", f"mlflow.tracking_uri={uri}"],
                capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path,
            )  # fmt: skip
            if "No available agent to submit job" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        log = job.stdout + job.stderr
        assert job.returncode == 0, log[-5000:]
        assert "succeeded" in log, log[-3000:]
        assert "4 architectures to try, 4 invalid combinations skipped" in log

        # the MLflow server holds the sweep: a parent run and one child run per trial
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("mblm-debug")
        runs = client.search_runs([exp.experiment_id], max_results=100)
        (parent,) = [r for r in runs if r.data.tags.get("mblm.kind") == "sweep"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["skipped_architectures"] == 4
        assert len(children) == 4
        for child in children:
            assert child.data.tags["mblm.kind"] == "trial"
            assert child.data.params["params.seq_lens"] == "[16, 8]"  # [8, 8] never launched
            assert client.get_metric_history(child.info.run_id, "valid_bpb")
            assert child.info.status in ("FINISHED", "KILLED")
        by_lr = {}
        for child in children:
            by_lr.setdefault(float(child.data.params["train.learning_rate"]), []).append(child)
        # ASHA stops the clearly worse trials (learning rate 1e-6) after their first validation
        for child in by_lr[1e-6]:
            assert child.data.tags.get("mblm.early_stopped") == "true"
            assert child.info.status == "KILLED"
            assert len(client.get_metric_history(child.info.run_id, "valid_bpb")) < 4
        best = [c for c in children if c.data.tags.get("mblm.best_trial") == "true"]
        assert len(best) == 1 and best[0].info.status == "FINISHED"
        assert float(best[0].data.params["train.learning_rate"]) == 3e-3
        assert len(client.get_metric_history(best[0].info.run_id, "valid_bpb")) == 4
        assert "test_bpb" in best[0].data.metrics
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"trials.md", "best.yaml", "valid_bpb.png"} <= artifacts

        # the best trial's config is ready to train
        best_yaml = out / "sweeps" / "debug-sweep" / "best.yaml"
        cfg = load_train_config(best_yaml)
        assert cfg.params.seq_lens == [16, 8] and cfg.train.learning_rate == 3e-3

        # the comparison: a table of the trials and a plot, also logged to the parent
        png = tmp_path / "cmp.png"
        assert cli_main(["compare", "debug-sweep", "--tracking-uri", uri, "--out", str(png)]) == 0
        assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
        png2 = tmp_path / "exp.png"
        assert cli_main(["compare", "mblm-debug", "--tracking-uri", uri, "--out", str(png2)]) == 0
    finally:
        _stop(head)
        _stop(server)
        head_log.close()
        server_log.close()
    assert head.returncode is not None and server.returncode is not None

    # `mblm ui` serves that store on 127.0.0.1
    ui_port = _free_port()
    ui_log = (tmp_path / "ui.log").open("w")
    ui = subprocess.Popen(
        [str(BIN / "mblm"), "ui", "--store", str(store), "--port", str(ui_port)],
        stdout=ui_log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{ui_port}/health", ui, tmp_path / "ui.log")
        url = f"http://127.0.0.1:{ui_port}/api/2.0/mlflow/experiments/get-by-name"
        with urllib.request.urlopen(f"{url}?experiment_name=mblm-debug", timeout=10) as resp:
            assert json.load(resp)["experiment"]["name"] == "mblm-debug"
    finally:
        _stop(ui)
        ui_log.close()


@pytest.mark.slow
def test_optuna_sweep_interrupted_and_resumed(tmp_path):
    """Ctrl+C after the first trial; the same command again finishes the sweep."""
    from mlflow.tracking import MlflowClient

    data = yaml.safe_load(DEBUG_SWEEP.read_text())
    data["base"] = str(ROOT / "configs" / "debug.yaml")
    data["set"] = [*data["set"], f"io.output_dir={tmp_path / 'out'}"]
    data["search"] = {"algorithm": "optuna", "num_samples": 2, "seed": 3}
    data["scheduler"] = {"type": "none"}
    data["space"] = {
        "params.block": ["transformer"],
        "train.learning_rate": {"loguniform": [0.001, 0.01]},
    }
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(data))
    cmd = [sys.executable, "-m", "mblm.cli", "tune", str(sweep)]
    env = _env()
    store = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"

    record_file = tmp_path / "out" / "sweeps" / "debug-sweep" / "sweep_run.json"

    def finished_trials() -> list:
        if not record_file.exists():  # the store is created (and migrated) before it
            return []
        client = MlflowClient(store)
        return [
            r
            for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
            if r.data.tags.get("mblm.kind") == "trial" and r.info.status == "FINISHED"
        ]

    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 400
        while not finished_trials():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in 400 s"
            time.sleep(1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=300) == 130, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    (first,) = finished_trials()
    client = MlflowClient(store)
    record = json.loads(
        (tmp_path / "out" / "sweeps" / "debug-sweep" / "sweep_run.json").read_text()
    )
    assert client.get_run(record["run_id"]).info.status == "KILLED"

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming the sweep" in again.stdout
    parent = client.get_run(record["run_id"])  # the same parent run, finished now
    assert parent.info.status == "FINISHED"
    done = finished_trials()
    assert len(done) == 2 and first.info.run_id in {r.info.run_id for r in done}
    assert len({r.data.tags["mblm.trial_id"] for r in done}) == 2
    # the first trial was not trained again
    assert len(client.get_metric_history(first.info.run_id, "valid_bpb")) == 4
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mblm.sweep_run_id` = '{parent.info.run_id}'"
    )
    assert not [r for r in children if r.info.status == "RUNNING"]
    lrs = [float(r.data.params["train.learning_rate"]) for r in done]
    assert all(0.001 <= lr <= 0.01 for lr in lrs) and lrs[0] != lrs[1]  # Optuna's samples
