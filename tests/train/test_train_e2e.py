"""End to end on a real local Ray and a real MLflow (sqlite) store: no mocks."""

from __future__ import annotations

from pathlib import Path

import pytest

from mblm.cli import main as cli_main
from mblm.model.checkpoint import load_model
from mblm.train.config import load_train_config
from mblm.train.run import train_mblm

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs" / "debug.yaml"


@pytest.fixture
def local_ray(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_two_workers_train_the_debug_config(tmp_path, local_ray):
    from mlflow.tracking import MlflowClient

    cfg = load_train_config(DEBUG, [f"io.output_dir={tmp_path}"])
    result = train_mblm(cfg)

    client = MlflowClient(result.tracking_uri)
    assert result.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["params.hidden_dims"] == "[32, 16]"
    assert run.data.params["ray.num_workers"] == "2"
    assert run.data.tags["mblm.world_size"] == "2"
    history = client.get_metric_history(result.run_id, "train_loss")
    assert len(history) == 4 and [m.step for m in history] == sorted(m.step for m in history)
    assert history[-1].value < history[0].value
    valid = client.get_metric_history(result.run_id, "valid_bpb")
    assert len(valid) == 2 and all(0 < m.value < 9 for m in valid)
    for name in ("bytes_per_second", "lr", "grad_norm", "test_bpb"):
        assert client.get_metric_history(result.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "model.pt"} <= artifacts
    # checkpoints in the run's storage, the best one exported as our model file
    assert result.checkpoint_path and Path(result.checkpoint_path, "state.pt").is_file()
    assert list((tmp_path / "ray" / "debug").glob("checkpoint_*"))
    model = load_model(result.model_path)
    assert model.hidden_dims == [32, 16]


@pytest.mark.slow
def test_stop_and_resume_ends_like_an_uninterrupted_run(tmp_path, local_ray):
    """Stopped after step 6 of 16 and started again: same MLflow run, same final losses."""
    from mlflow.tracking import MlflowClient

    def config(out):
        return load_train_config(DEBUG, [f"io.output_dir={out}", "io.log_train_loss_amount=8"])

    whole = train_mblm(config(tmp_path / "whole"))
    first = train_mblm(config(tmp_path / "parts"), stop_after_steps=6)
    assert first.stopped_early and first.step == 6 and first.total_steps == 16
    client = MlflowClient(first.tracking_uri)
    run = client.get_run(first.run_id)
    assert run.info.status == "KILLED" and run.data.tags["mblm.stopped_at_step"] == "6"
    assert not client.get_metric_history(first.run_id, "test_loss")  # not run to the end

    second = train_mblm(config(tmp_path / "parts"))
    assert second.run_id == first.run_id and not second.stopped_early
    assert client.get_run(second.run_id).info.status == "FINISHED"

    def history(result, name):
        rows = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, name)
        return {m.step: m.value for m in rows}

    whole_train, parts_train = history(whole, "train_loss"), history(second, "train_loss")
    assert sorted(parts_train) == sorted(whole_train) == [2, 4, 6, 8, 10, 12, 14, 16]
    for step in whole_train:  # before the stop, and after the resume at step 6
        assert parts_train[step] == pytest.approx(whole_train[step], rel=1e-6), step
    assert history(second, "valid_loss")[16] == pytest.approx(
        history(whole, "valid_loss")[16], rel=1e-6
    )
    assert history(second, "test_loss")[16] == pytest.approx(
        history(whole, "test_loss")[16], rel=1e-6
    )
    assert history(second, "valid_loss").keys() == {6, 8, 16}  # + the stop's checkpoint

    # a changed model cannot resume from that folder: a clear error, before Ray or MLflow
    changed = load_train_config(
        DEBUG, [f"io.output_dir={tmp_path / 'parts'}", "params.hidden_dims=[48, 16]"]
    )
    with pytest.raises(ValueError, match=r"params\.hidden_dims: \[32, 16\] then, \[48, 16\] now"):
        train_mblm(changed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["io.dataset_id=nosuch"], r"io.dataset_id: unknown dataset 'nosuch'; known: bytes"),
        (["io.dataset_id=bytes", "io.dataset_dir={tmp}/missing"], "dataset_dir not found"),
        (["io.dataset_id=bytes", "io.dataset_dir={tmp}/empty"], "no files in"),
        (["io.dataset_id=bytes", "io.dataset_dir={tmp}/tiny"], "no train window of"),
        (["train.batch_sise=3"], r"train\.batch_sise: Extra inputs are not permitted"),
        (["params.input_seq_len=4096"], "input_seq_len=4096 exceeds"),
    ],
)
def test_bad_input_fails_before_any_run(tmp_path, capsys, overrides, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "a.txt").write_text("too short")
    out = tmp_path / "out"
    args = [s.replace("{tmp}", str(tmp_path)) for s in overrides]
    code = cli_main(
        [
            "train",
            str(DEBUG),
            "--set",
            f"io.output_dir={out}",
            *sum((["--set", a] for a in args), []),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "error:" in err and len(err.strip().splitlines()) == 1
    assert pytest.importorskip("re").search(message, err), err
    assert not (out / "mlflow.db").exists()  # no run was started, none left RUNNING
    assert not (out / "ray").exists()


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("io: [oops\n")
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "malformed YAML" in err and len(err.splitlines()) == 1


def test_unreachable_tracking_server_fails_before_training(tmp_path, capsys):
    import socket

    with socket.socket() as sock:  # a free port on 127.0.0.1 that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    code = cli_main(
        [
            "train",
            str(DEBUG),
            "--set",
            f"io.output_dir={out}",
            "--set",
            f"mlflow.tracking_uri=http://127.0.0.1:{port}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"MLflow tracking server http://127.0.0.1:{port} is unreachable" in err
    assert not (out / "ray").exists()


@pytest.mark.slow
def test_killed_worker_is_replaced_and_the_run_resumes(tmp_path):
    """`mblm train` as a user runs it; a training worker is SIGKILLed after the first checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mlflow.tracking import MlflowClient

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    cmd = [
        sys.executable,
        "-m",
        "mblm.cli",
        "train",
        str(DEBUG),
        "--set",
        f"io.output_dir={tmp_path}",
        "--set",
        "ray.max_failures=1",
        "--set",
        "train.target_elements=120000",
        "--set",
        "io.validate_amount=4",
        "--set",
        "io.num_models_to_save=4",
        "--set",
        "io.log_train_loss_amount=40",
    ]
    log = (tmp_path / "train.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        # kill once Ray Train's controller has registered the first checkpoint (step 30 of
        # 118; it then writes its snapshot) and training went on past it
        snapshot = tmp_path / "ray" / "debug" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 300
        while not (snapshot.exists() and _progress_past(tmp_path / "train.log", 30)):
            assert proc.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training did not pass step 30 in 300 s"
            time.sleep(0.2)
        workers = _pids_titled("RayTrainWorker")
        assert workers, "no Ray Train worker process found"
        os.kill(workers[-1], signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, (tmp_path / "train.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    out = (tmp_path / "train.log").read_text()
    assert "[mblm] resumed at step" in out
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "valid_loss")]
    assert max(steps) == 120000 // 1024 + (120000 % 1024 > 0)  # ran to the planned last step


def _pids_titled(word: str) -> list[int]:
    """Processes whose command line (Ray sets it to the actor's name) mentions ``word``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if word in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def _progress_past(log: Path, step: int) -> bool:
    import re

    text = log.read_text(errors="replace") if log.exists() else ""
    return any(int(m) > step for m in re.findall(r"\[mblm\] step (\d+)/", text))
