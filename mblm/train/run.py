"""The driver: check everything, plan, start Ray, run a TorchTrainer, track it in MLflow."""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mblm.data.corpus import open_corpus
from mblm.data.registry import dataset_registry
from mblm.data.types import ModelMode
from mblm.train.config import TrainEntryConfig
from mblm.train.plan import RunPlan, make_plan


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    model_path: Path | None
    metrics: dict[str, Any]
    checkpoint_path: str | None


def _code_version() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    from mblm import __version__

    return __version__


def _data(cfg: TrainEntryConfig) -> tuple[dict[str, Any], Any, int, int]:
    """(Ray datasets, custom dataset class or None, valid windows, test windows)."""
    seq = cfg.params.input_seq_len
    io = cfg.io
    if dataset_registry.is_built_in(io.dataset_id):
        import ray.data

        # our own progress lines say more than Ray Data's bars, which flood a terminal
        ray.data.DataContext.get_current().enable_progress_bars = False
        corpora = {m: open_corpus(io.dataset_id, io.dataset_dir, seq, m) for m in ModelMode}
        datasets = {m.value: c.to_ray_dataset() for m, c in corpora.items()}
        return (
            datasets,
            None,
            corpora[ModelMode.VALID].num_windows,
            corpora[ModelMode.TEST].num_windows,
        )
    klass = dataset_registry.retrieve(io.dataset_id)
    world = cfg.ray.num_workers

    def windows(mode: ModelMode) -> int:
        return len(klass.from_train_entry_config(cfg, mode, 0, world)) * world  # type: ignore[attr-defined]

    test = windows(ModelMode.TEST) if klass.supports_test_mode() else 0
    windows(ModelMode.TRAIN)  # fails early if the training data is unusable
    return {}, klass, windows(ModelMode.VALID), test


def _init_ray(cfg: TrainEntryConfig, address: str | None) -> float:
    """Start or join Ray; returns the CPUs each training worker reserves.

    On a local Ray the workers reserve at most all cores but one, fractionally if needed: Ray
    Data only schedules its read tasks on CPUs that Ray Train has not reserved, so workers
    holding every core (two 1-CPU workers on a 2-core laptop) would wait for data forever.
    """
    import ray

    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    local = not address
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(include_dashboard=False)
    if not local:
        return cfg.ray.cpus_per_worker
    cores = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    share = max(0.1, (cores - 1) / cfg.ray.num_workers)
    if cfg.ray.cpus_per_worker > share:
        print(
            f"[mblm] local Ray with {cores:g} CPUs: each of {cfg.ray.num_workers} workers "
            f"reserves {share:.2g} CPU (not {cfg.ray.cpus_per_worker:g}) so Ray Data can read",
            flush=True,
        )
        return share
    return cfg.ray.cpus_per_worker


def train_mblm(config: TrainEntryConfig, address: str | None = None) -> TrainResult:
    """Train from a validated config: locally (a sized local Ray) or on a cluster."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mblm.model.checkpoint import save_model
    from mblm.tracking.mlflow import (
        RunLogger,
        check_reachable,
        end_run,
        resolve_tracking,
        start_run,
    )
    from mblm.train.checkpoint import model_from_training_state
    from mblm.train.loop import train_loop_per_worker

    cfg = config
    dataset_registry.check(cfg.io.dataset_id)
    datasets, klass, valid_windows, test_windows = _data(cfg)
    plan: RunPlan = make_plan(cfg, valid_windows, test_windows)
    out = Path(cfg.io.output_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = Path(cfg.ray.storage_path or out / "ray").expanduser().resolve()

    check_reachable(resolve_tracking(cfg)[0])  # an unreachable server fails before Ray starts
    worker_cpus = _init_ray(cfg, address)
    tags = {
        "mblm.dataset": f"{cfg.io.dataset_id}:{cfg.io.dataset_dir}",
        "mblm.world_size": str(cfg.ray.num_workers),
        "mblm.code_version": _code_version(),
        "mblm.kind": "train",
    }
    uri, run_id = start_run(cfg, tags)
    print(f"[mblm] MLflow run {run_id} ({uri}); {plan.total_steps} steps", flush=True)
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "plan": plan.model_dump(),
                "mlflow_tracking_uri": uri,
                "mlflow_run_id": run_id,
                "dataset_class": klass,
            },
            scaling_config=ScalingConfig(
                num_workers=cfg.ray.num_workers,
                use_gpu=cfg.ray.use_gpu,
                resources_per_worker={
                    "CPU": worker_cpus,
                    **({"GPU": cfg.ray.gpus_per_worker or 1} if cfg.ray.use_gpu else {}),
                },
            ),
            run_config=RunConfig(
                name=cfg.io.name_model,
                storage_path=str(storage),
                failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
                # workers print progress themselves; Ray's print patch would echo each line
                worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},  # type: ignore[call-arg]
                checkpoint_config=CheckpointConfig(
                    num_to_keep=cfg.io.num_models_to_save,
                    checkpoint_score_attribute="valid_loss",
                    checkpoint_score_order="min",
                ),
            ),
            datasets=datasets,
        )
        result = trainer.fit()
        logger = RunLogger(uri, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            logger.log_artifact(config_path)
        model_path = None
        best = result.get_best_checkpoint("valid_loss", "min") if result.best_checkpoints else None
        if best is not None:
            with best.as_directory() as folder:
                model = model_from_training_state(Path(folder))
            model_path = save_model(model, out / "model.pt")
            logger.log_artifact(model_path)
        end_run(uri, run_id, "FINISHED")
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    print(f"[mblm] done: MLflow run {run_id} in {uri}; best model: {model_path}", flush=True)
    return TrainResult(
        run_id=run_id,
        tracking_uri=uri,
        model_path=model_path,
        metrics=dict(result.metrics or {}),
        checkpoint_path=best.path if best is not None else None,
    )
