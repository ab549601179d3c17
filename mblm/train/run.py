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
    step: int  # the last step trained
    total_steps: int

    @property
    def stopped_early(self) -> bool:
        return self.step < self.total_steps


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


def _data(cfg: TrainEntryConfig) -> tuple[dict[ModelMode, Any], Any, int, int]:
    """(built-in corpora by split, custom dataset class or None, valid windows, test windows).

    Checks the data without starting Ray: a bad corpus fails here, before any compute.
    """
    seq = cfg.params.input_seq_len
    io = cfg.io
    if dataset_registry.is_built_in(io.dataset_id):
        corpora = {m: open_corpus(io.dataset_id, io.dataset_dir, seq, m) for m in ModelMode}
        return (
            corpora,
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


def _ray_datasets(corpora: dict[ModelMode, Any]) -> dict[str, Any]:
    """Streaming Ray datasets of the corpora (Ray must be up: else Ray Data starts its own)."""
    if not corpora:
        return {}
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # our own progress lines say more than Ray Data's bars, which flood a terminal
    ctx.enable_progress_bars = False
    # the same windows reach the same worker in the same order on every run, so a
    # resumed run skips exactly the batches it already trained on
    ctx.execution_options.preserve_order = True
    return {m.value: c.to_ray_dataset() for m, c in corpora.items()}


def warn_if_data_starves(reserved_cpus: float) -> None:
    """Ray Data's read tasks need a whole CPU that the training workers do not hold."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    if total - reserved_cpus < 1:
        print(
            f"[mblm] warning: the workers reserve {reserved_cpus:g} of the cluster's {total:g} "
            f"CPUs; Ray Data's readers need 1 CPU of their own, so training waits for data "
            "until the cluster grows: lower ray.cpus_per_worker or add nodes",
            flush=True,
        )


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
            # "local": a new Ray, even when `ray start` left a head running on this machine
            ray.init("local", include_dashboard=False)
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


def train_mblm(
    config: TrainEntryConfig,
    address: str | None = None,
    stop_after_steps: int | None = None,
    tags: dict[str, str] | None = None,
    tune_trial: bool = False,
) -> TrainResult:
    """Train from a validated config: locally (a sized local Ray) or on a cluster.

    A run whose folder (``<storage_path>/<io.name_model>``) holds a checkpoint resumes from it
    at the exact step, logging into the same MLflow run. ``stop_after_steps`` ends this call
    after that step with a checkpoint; calling again with the same config resumes there.
    ``tags`` go on the MLflow run. ``tune_trial``: called inside a Ray Tune trial, whose
    scheduler then sees every validation (``ray.tune``'s Train-to-Tune callback); the workers
    reserve ``ray.cpus_per_worker`` as configured.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mblm.model.checkpoint import parameter_count, save_model
    from mblm.tracking.mlflow import (
        RunLogger,
        check_reachable,
        end_run,
        reopen_run,
        resolve_tracking,
        start_run,
    )
    from mblm.train.checkpoint import model_from_training_state
    from mblm.train.loop import train_loop_per_worker
    from mblm.train.storage import RunFolder, resume_settings

    cfg = config
    if stop_after_steps is not None and stop_after_steps < 1:
        raise ValueError(f"stop_after_steps must be >= 1, got {stop_after_steps}")
    dataset_registry.check(cfg.io.dataset_id)
    corpora, klass, valid_windows, test_windows = _data(cfg)
    plan: RunPlan = make_plan(cfg, valid_windows, test_windows)
    out = Path(cfg.io.output_dir).expanduser().resolve()
    folder = RunFolder(cfg)
    resuming = folder.has_checkpoint()
    if resuming:
        folder.check_resumable(cfg)  # before anything starts: a clear error, nothing written

    uri = resolve_tracking(cfg)[0]
    check_reachable(uri)  # an unreachable server fails before Ray starts
    out.mkdir(parents=True, exist_ok=True)
    worker_cpus = cfg.ray.cpus_per_worker if tune_trial else _init_ray(cfg, address)
    warn_if_data_starves(cfg.ray.num_workers * worker_cpus)
    datasets = _ray_datasets(corpora)
    tags = {
        "mblm.dataset": f"{cfg.io.dataset_id}:{cfg.io.dataset_dir}",
        "mblm.world_size": str(cfg.ray.num_workers),
        "mblm.code_version": _code_version(),
        "mblm.kind": "train",
        "mblm.num_params": f"{parameter_count(cfg.params.model_config_only()):,}",
        **(tags or {}),
    }
    callbacks = []
    if tune_trial:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())  # [ray] every report reaches the Tune trial
    record = folder.read_record() if resuming else None
    if record and record.get("tracking_uri") == uri and reopen_run(uri, record["run_id"]):
        run_id = record["run_id"]
    else:
        uri, run_id = start_run(cfg, tags)
    folder.write_record({"tracking_uri": uri, "run_id": run_id, "settings": resume_settings(cfg)})
    if resuming:
        print(f"[mblm] resuming the run in {folder.path} from its last checkpoint", flush=True)
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
                "stop_after_steps": stop_after_steps,
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
                callbacks=callbacks,  # type: ignore[arg-type]
                storage_path=folder.root,
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
        metrics = dict(result.metrics or {})
        step = int(metrics.get("step", plan.total_steps))
        logger = RunLogger(uri, run_id)
        with tempfile.TemporaryDirectory() as tmp:
            config_path = Path(tmp) / "config.yaml"
            config_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            logger.log_artifact(config_path)
        model_path = None
        best = result.get_best_checkpoint("valid_loss", "min") if result.best_checkpoints else None
        if best is not None:
            with best.as_directory() as ckpt:
                model = model_from_training_state(Path(ckpt))
            model_path = save_model(model, out / "model.pt")
            logger.log_artifact(model_path)
        if step < plan.total_steps:
            # stopped on request: KILLED until the run is started again and resumes
            logger.client.set_tag(run_id, "mblm.stopped_at_step", str(step))
            end_run(uri, run_id, "KILLED")
        else:
            end_run(uri, run_id, "FINISHED")
    except KeyboardInterrupt:
        end_run(uri, run_id, "KILLED")  # interrupted, not broken: running again resumes
        raise
    except BaseException:
        end_run(uri, run_id, "FAILED")
        raise
    if step < plan.total_steps:
        print(
            f"[mblm] stopped after step {step}/{plan.total_steps} with a checkpoint in "
            f"{folder.path}: run the same command again to resume",
            flush=True,
        )
    print(f"[mblm] done: MLflow run {run_id} in {uri}; best model: {model_path}", flush=True)
    return TrainResult(
        run_id=run_id,
        tracking_uri=uri,
        model_path=model_path,
        metrics=metrics,
        checkpoint_path=best.path if best is not None else None,
        step=step,
        total_steps=plan.total_steps,
    )
