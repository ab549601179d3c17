"""MLflow for training runs: where to track, run lifecycle, rank-0 metric logging."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from mblm.train.config import TrainEntryConfig

MAX_PARAM_CHARS = 6000


def resolve_tracking(cfg: TrainEntryConfig) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment).

    Order: the config, then ``MLFLOW_TRACKING_URI``, then a sqlite store under
    ``io.output_dir`` with its artifacts next to it (absolute paths).
    """
    import os

    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri, None
    out = Path(cfg.io.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out / 'mlflow.db'}", (out / "mlartifacts").as_uri()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, before training, when a tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 400:
                raise OSError(f"HTTP {resp.status}")
    except (OSError, urllib.error.URLError) as err:
        raise ConnectionError(f"MLflow tracking server {uri} is unreachable: {err}") from None


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b.c": "value"} (lists of mappings indexed: block.0.d_state)."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(data, list) and any(isinstance(v, dict) for v in data):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = str(data)[:MAX_PARAM_CHARS]
    return out


def start_run(cfg: TrainEntryConfig, tags: dict[str, str]) -> tuple[str, str]:
    """Create the experiment (if needed) and a RUNNING run with the flattened config."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    uri, artifacts = resolve_tracking(cfg)
    check_reachable(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment_name)
    exp_id = (
        exp.experiment_id
        if exp is not None
        else client.create_experiment(cfg.mlflow.experiment_name, artifact_location=artifacts)
    )
    run = client.create_run(exp_id, run_name=cfg.mlflow.run_name or cfg.io.name_model, tags=tags)
    params = [Param(k, v) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    return uri, run.info.run_id


def reopen_run(uri: str, run_id: str) -> bool:
    """Mark an earlier run RUNNING again (a resumed training run); False if it is gone."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        if client.get_run(run_id).info.lifecycle_stage == "deleted":
            return False
    except MlflowException:
        return False
    client.update_run(run_id, status="RUNNING")
    if "mblm.stopped_at_step" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "mblm.stopped_at_step")
    return True


def end_run(uri: str, run_id: str, status: str) -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status)


class RunLogger:
    """Logs metrics to one run; a failed call warns and training goes on."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(
                self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
            )
        except Exception as err:  # a flaky server must not stop training
            warnings.warn(f"MLflow logging failed at step {step} (continuing): {err}", stacklevel=2)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)
