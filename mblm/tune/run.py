"""The sweep driver: check the space, then Ray Tune runs one TorchTrainer per trial.

Ray 2.60's Train V2 pattern: each Tune trial is a plain function (:func:`run_trial`) that
builds and fits a ``TorchTrainer`` through :func:`mblm.train.run.train_mblm`; Ray Train's
Train-to-Tune callback forwards every validation to the trial, so ASHA can stop it. MLflow
gets one parent run per sweep and one nested child run per trial, in the base config's
experiment, next to the runs of ``mblm train``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mblm.train.config import TrainEntryConfig
from mblm.tune.config import SweepConfig
from mblm.tune.space import SpaceReport, apply, architectures, check, load_base, summarize

SWEEP_RECORD = "sweep_run.json"
CANDIDATES = "architectures.json"
TRIAL_CPUS = 0.01


@dataclass
class TrialRow:
    trial_id: str
    architecture: str
    overrides: dict[str, Any]
    num_params: int
    metric: float | None  # best value of the sweep's metric
    bytes_per_second: float | None
    step: int
    total_steps: int
    status: str  # done | stopped early | error
    run_id: str | None = None


@dataclass
class SweepResult:
    parent_run_id: str
    tracking_uri: str
    rows: list[TrialRow]
    skipped: int
    best: TrialRow | None
    best_config_path: Path | None
    sweep_dir: str


def sweep_dir(sweep: SweepConfig, base: dict[str, Any]) -> str:
    if sweep.output_dir:
        return str(Path(sweep.output_dir).expanduser().resolve())
    return str((Path(base["io"]["output_dir"]) / "sweeps" / sweep.name).expanduser().resolve())


def _storage(base: dict[str, Any], folder: str, sweep: SweepConfig) -> tuple[str, str | None]:
    """(Tune's storage path, trials' ray.storage_path): shared storage when configured."""
    shared = (base.get("ray") or {}).get("storage_path")
    if shared and "://" in shared:
        root = f"{shared.rstrip('/')}/sweeps/{sweep.name}"
        return f"{root}/tune", f"{root}/trials"
    if shared:
        root = str(Path(shared).expanduser().resolve() / "sweeps" / sweep.name)
        return f"{root}/tune", f"{root}/trials"
    return f"{folder}/tune", None


def trial_config(context: dict[str, Any], trial_id: str, overrides: dict[str, Any]) -> dict:
    """The full training config of one trial."""
    data = apply(context["base"], overrides)
    res = context["resources"]
    name = f"{context['sweep']}-{trial_id}"
    data["io"] = {
        **data["io"],
        "name_model": name,
        "output_dir": f"{context['folder']}/trials/{trial_id}",
    }
    data["ray"] = {
        **(data.get("ray") or {}),
        "num_workers": res["workers_per_trial"],
        "cpus_per_worker": context["worker_cpus"],
        "use_gpu": res["use_gpu"],
        "gpus_per_worker": res["gpus_per_worker"],
        "storage_path": context["trial_storage"],
        "address": None,
    }
    data["mlflow"] = {
        **(data.get("mlflow") or {}),
        "tracking_uri": context["tracking_uri"],
        "run_name": f"{context['sweep']}/{trial_id}",
    }
    return data


def run_trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One Tune trial: train its architecture with Ray Train (a child MLflow run)."""
    import ray.tune

    from mblm.train.run import train_mblm

    trial_id = ray.tune.get_context().get_trial_id()  # [ray]
    overrides = {**context["archs"][config["arch"]], **config.get("continuous", {})}
    cfg = TrainEntryConfig.model_validate(trial_config(context, trial_id, overrides))
    tags = {
        "mlflow.parentRunId": context["parent_run_id"],
        "mblm.kind": "trial",
        "mblm.sweep": context["sweep"],
        "mblm.sweep_run_id": context["parent_run_id"],
        "mblm.trial_id": trial_id,
        "mblm.architecture": summarize(cfg),
        "mblm.overrides": json.dumps(overrides),
    }
    train_mblm(cfg, tags=tags, tune_trial=True)


def _local_worker_cpus(sweep: SweepConfig, address: str | None) -> float:
    """Start or join Ray; on a local Ray keep a core free for Ray Data (see train)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address) if address else ray.init("local", include_dashboard=False)
    res = sweep.resources
    if address:
        return res.cpus_per_worker
    cores = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    trials = res.max_concurrent_trials
    share = max(0.1, (cores - 1 - trials * TRIAL_CPUS) / (res.workers_per_trial * trials))
    if res.cpus_per_worker > share:
        print(
            f"[mblm] local Ray with {cores:g} CPUs: each trial worker reserves {share:.2g} "
            f"CPU (not {res.cpus_per_worker:g}) so Ray Data can read",
            flush=True,
        )
        return share
    return res.cpus_per_worker


def _parent_run(
    sweep: SweepConfig, base_cfg: TrainEntryConfig, folder: str, space: SpaceReport
) -> tuple[str, str, bool]:
    """(tracking URI, parent run id, resumed): reopened when the sweep is resumed."""
    from mlflow.entities import Param

    from mblm.tracking.mlflow import check_reachable, flatten, reopen_run, resolve_tracking

    uri, artifacts = resolve_tracking(base_cfg)
    check_reachable(uri)
    record_path = Path(folder) / SWEEP_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("tracking_uri") == uri and reopen_run(uri, record["run_id"]):
            return uri, record["run_id"], True
    from mlflow.tracking import MlflowClient

    from mblm.train.run import _code_version

    client = MlflowClient(uri)
    name = base_cfg.mlflow.experiment_name
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifacts)
    run = client.create_run(
        exp_id,
        run_name=f"sweep {sweep.name}",
        tags={
            "mblm.kind": "sweep",
            "mblm.sweep": sweep.name,
            "mblm.code_version": _code_version(),
        },
    )
    params = {
        **flatten(sweep.model_dump(mode="json", exclude={"space", "blocks"})),
        **{
            f"space.{k}": json.dumps(v.model_dump(exclude_none=True))
            for k, v in sweep.space.items()
        },
        "architectures": str(len(space.candidates)),
        "skipped_architectures": str(space.skipped),
    }
    client.log_batch(run.info.run_id, params=[Param(k, v[:6000]) for k, v in params.items()])
    record_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = record_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}))
    tmp.replace(record_path)
    return uri, run.info.run_id, False


def _tuner(sweep: SweepConfig, context: dict[str, Any], tune_storage: str, n_archs: int):
    from ray import tune
    from ray.tune import RunConfig, TuneConfig, Tuner

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        # the trial only drives its TorchTrainer, whose workers hold the CPUs (Tune refuses 0)
        {"CPU": TRIAL_CPUS},
    )
    path = f"{tune_storage}/{sweep.name}"
    if Tuner.can_restore(path):
        print(f"[mblm] resuming the sweep in {path}", flush=True)
        return Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)

    search = sweep.search
    scheduler = None
    if sweep.scheduler.type == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            # validations so far, counted by the training loop: right after a resume too
            time_attr="validation",
            # beyond the last validation: a trial that gets there ends by itself (test
            # evaluation, MLflow run FINISHED) instead of being stopped at max_t
            max_t=max(context["validations"], sweep.scheduler.grace_period) + 1,
            grace_period=sweep.scheduler.grace_period,
            reduction_factor=sweep.scheduler.reduction_factor,
        )
    search_alg = None
    if search.algorithm == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        continuous = {}
        for path_, spec in sweep.space.items():
            if spec.uniform is not None:
                continuous[path_] = tune.uniform(*spec.uniform)
            elif spec.loguniform is not None:
                continuous[path_] = tune.loguniform(*spec.loguniform)
        space: dict[str, Any] = {"arch": tune.choice(list(range(n_archs)))}
        if continuous:
            space["continuous"] = continuous
        search_alg = OptunaSearch(seed=search.seed)
        num_samples = search.trials
    else:  # grid and random: the checked candidates, in order
        space = {"arch": tune.grid_search(list(range(n_archs)))}
        num_samples = search.trials if search.algorithm == "grid" else 1
    return Tuner(
        trainable,
        param_space=space,
        tune_config=TuneConfig(
            metric=search.metric,
            mode=search.mode,
            scheduler=scheduler,
            search_alg=search_alg,
            num_samples=num_samples,
            max_concurrent_trials=sweep.resources.max_concurrent_trials,
        ),
        run_config=RunConfig(name=sweep.name, storage_path=tune_storage, verbose=0),
    )


def _rows(results: Any, context: dict[str, Any], infos: list[dict[str, Any]], sweep: SweepConfig):
    rows = []
    for result in results:
        config = result.config or {}
        arch = config.get("arch")
        info = infos[arch] if isinstance(arch, int) and arch < len(infos) else {}
        overrides = {**info.get("overrides", {}), **config.get("continuous", {})}
        frame = result.metrics_dataframe
        metric = None
        if frame is not None and sweep.search.metric in frame:
            values = frame[sweep.search.metric].dropna()
            if len(values):
                metric = float(values.min() if sweep.search.mode == "min" else values.max())
        last = result.metrics or {}
        step, total = int(last.get("step", 0)), int(last.get("total_steps", 0))
        if result.error is not None:
            status = "error"
        elif total and step >= total:
            status = "done"
        else:
            status = "stopped early"
        rows.append(
            TrialRow(
                trial_id=str(last.get("trial_id") or Path(result.path).name),
                architecture=info.get("summary", "?"),
                overrides=overrides,
                num_params=int(info.get("num_params", 0)),
                metric=metric,
                bytes_per_second=last.get("bytes_per_second"),
                step=step,
                total_steps=total,
                status=status,
            )
        )
    return rows


def format_table(rows: list[TrialRow], metric: str) -> str:
    head = (
        f"| trial | architecture | overrides | params | best {metric} | bytes/s | steps | status |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cont = {k: v for k, v in r.overrides.items() if isinstance(v, float)}
        extra = ", ".join(f"{k}={v:.3g}" for k, v in cont.items()) or "-"
        value = f"{r.metric:.4f}" if r.metric is not None else "-"
        rate = f"{r.bytes_per_second:,.0f}" if r.bytes_per_second else "-"
        lines.append(
            f"| {r.trial_id} | {r.architecture} | {extra} | {r.num_params:,} | {value} | "
            f"{rate} | {r.step}/{r.total_steps} | {r.status} |"
        )
    return "\n".join(lines)


def tune_mblm(sweep: SweepConfig, address: str | None = None) -> SweepResult:
    """Run (or resume) a sweep; returns its table, best trial and best config file."""
    from mlflow.tracking import MlflowClient

    from mblm.data.registry import dataset_registry
    from mblm.tracking.compare import plot_runs
    from mblm.tracking.mlflow import end_run
    from mblm.train.plan import make_plan
    from mblm.train.run import _data, warn_if_data_starves

    base = load_base(sweep)
    base_cfg = TrainEntryConfig.model_validate(base)
    space = architectures(sweep, base)  # no valid architecture: an error, nothing started
    dataset_registry.check(base_cfg.io.dataset_id)
    folder = sweep_dir(sweep, base)
    tune_storage, trial_storage = _storage(base, folder, sweep)
    print(
        f"[mblm] sweep {sweep.name}: {len(space.candidates)} architectures to try, "
        f"{space.skipped} invalid combinations skipped"
        + (
            " (" + "; ".join(f"{n} x {r}" for r, n in space.reasons.items()) + ")"
            if space.reasons
            else ""
        ),
        flush=True,
    )
    # the data must be usable by every trial before any starts (the errors of mblm train)
    probe = {"base": base, "folder": folder, "sweep": sweep.name, "worker_cpus": 1.0,
             "resources": sweep.resources.model_dump(), "trial_storage": None,
             "tracking_uri": None}  # fmt: skip
    windows: dict[int, tuple[int, int]] = {}  # (valid, test) windows by window length
    for cand in space.candidates:
        trial_cfg = TrainEntryConfig.model_validate(trial_config(probe, "check", cand.overrides))
        seq = trial_cfg.params.input_seq_len
        if seq not in windows:
            windows[seq] = _data(trial_cfg)[2:]
        make_plan(trial_cfg, *windows[seq])  # too few windows for the trial: an error now
    # every trial validates at most io.validate_amount times (not sweepable)
    validations = base_cfg.io.validate_amount

    _pin_candidates(space, folder, tune_storage, sweep)
    worker_cpus = _local_worker_cpus(sweep, address or base_cfg.ray.address)
    res = sweep.resources
    warn_if_data_starves(
        res.max_concurrent_trials * (res.workers_per_trial * worker_cpus + TRIAL_CPUS)
    )
    uri, parent, resumed = _parent_run(sweep, base_cfg, folder, space)
    print(f"[mblm] MLflow parent run {parent} ({uri})", flush=True)
    infos = [
        {"overrides": c.overrides, "summary": c.summary, "num_params": c.num_params}
        for c in space.candidates
    ]
    context = {
        "base": base,
        "archs": [c.overrides for c in space.candidates],
        "sweep": sweep.name,
        "folder": folder,
        "resources": sweep.resources.model_dump(),
        "worker_cpus": worker_cpus,
        "trial_storage": trial_storage,
        "tracking_uri": uri,
        "parent_run_id": parent,
        "validations": validations,
    }
    client = MlflowClient(uri)
    try:
        tuner = _tuner(sweep, context, tune_storage, len(space.candidates))
        results = _fit_noting_interrupts(tuner)
        rows = _rows(results, context, infos, sweep)
        if rows and all(r.status == "error" for r in rows):
            first = str(results.errors[0]).strip().splitlines() if results.errors else []
            raise ValueError(
                f"every trial of sweep {sweep.name} failed (the first: "
                f"{first[-1] if first else 'no error message'}); see the log above"
            )
        children = _finish_children(client, parent, rows)
        best = _best(rows, sweep)
        best_path = None
        if best is not None:
            best_path = _write_best_config(sweep, base, best, folder)
            if best.run_id:
                client.set_tag(best.run_id, "mblm.best_trial", "true")
                client.set_tag(parent, "mblm.best_run_id", best.run_id)
            if best.metric is not None:
                client.log_metric(parent, f"best_{sweep.search.metric}", best.metric)
        client.log_metric(parent, "skipped_architectures", space.skipped)
        table = format_table(rows, sweep.search.metric)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "trials.md").write_text(table + "\n")
            client.log_artifact(parent, str(Path(tmp) / "trials.md"))
            if best_path is not None:
                client.log_artifact(parent, str(best_path))
            png = plot_runs(client, children, Path(tmp) / "valid_bpb.png", title=sweep.name)
            if png is not None:
                client.log_artifact(parent, str(png))
        end_run(uri, parent, "FINISHED")
    except KeyboardInterrupt:
        _finish_children(client, parent, [])  # trials cut short: KILLED, not RUNNING
        end_run(uri, parent, "KILLED")
        print("[mblm] sweep interrupted: run the same command again to resume it", flush=True)
        raise
    except BaseException:
        end_run(uri, parent, "FAILED")
        raise
    print(table, flush=True)
    if best is not None:
        print(
            f"[mblm] best: {best.trial_id} ({best.architecture}) {sweep.search.metric} "
            f"{best.metric:.4f}; config: {best_path}",
            flush=True,
        )
    return SweepResult(parent, uri, rows, space.skipped, best, best_path, folder)


def _pin_candidates(space: SpaceReport, folder: str, tune_storage: str, sweep: SweepConfig) -> None:
    """Trials know their architecture by its index: a resumed sweep must index the same list.

    The list is written next to the sweep's record when it starts; a sweep resumed with a
    space, base config or limits that now give other architectures is refused.
    """
    from ray.tune import Tuner

    path = Path(folder) / CANDIDATES
    now = [c.overrides for c in space.candidates]
    if path.is_file() and Tuner.can_restore(f"{tune_storage}/{sweep.name}"):
        then = json.loads(path.read_text())
        if then != json.loads(json.dumps(now)):
            raise ValueError(
                f"{sweep.source}: the sweep in {folder} was started with other architectures "
                f"({len(then)} then, {len(now)} now; the first that differs: "
                f"{next((a for a, b in zip(then, now, strict=False) if a != b), 'none')}): "
                "it cannot resume; restore the sweep file, or rename the sweep to start anew"
            )
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, indent=1))
    tmp.replace(path)


def _fit_noting_interrupts(tuner: Any) -> Any:
    """``tuner.fit()``; KeyboardInterrupt if Tune caught a Ctrl+C (it saves and returns).

    Tune's handler replaces the current one and puts it back on the first SIGINT only, so
    a marker handler installed before the fit is back in place exactly when one arrived.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or int(
        os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0")
    ):
        return tuner.fit()  # Tune installs no handler: Ctrl+C raises KeyboardInterrupt

    def marker(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, marker)
    try:
        results = tuner.fit()
        interrupted = signal.getsignal(signal.SIGINT) is marker
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return results


def _finish_children(client: Any, parent: str, rows: list[TrialRow]) -> list[Any]:
    """Attach child runs to rows; runs of trials stopped early are marked KILLED, not RUNNING."""
    runs = client.search_runs(
        experiment_ids=[client.get_run(parent).info.experiment_id],
        filter_string=f"tags.`mblm.sweep_run_id` = '{parent}'",
        order_by=["attributes.start_time ASC"],
        max_results=10000,
    )
    by_trial = {r.data.tags.get("mblm.trial_id"): r for r in runs}
    if not rows:
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
        return runs
    for row in rows:
        run = by_trial.get(row.trial_id)
        if run is None:
            continue
        row.run_id = run.info.run_id
        if row.status == "stopped early":
            # the scheduler stopped it: its run ends KILLED, however its trial was torn down
            client.set_tag(row.run_id, "mblm.early_stopped", "true")
            if run.info.status != "FINISHED":
                client.set_terminated(row.run_id, "KILLED")
        elif run.info.status == "RUNNING":
            client.set_terminated(row.run_id, "FAILED" if row.status == "error" else "KILLED")
    return runs


def _best(rows: list[TrialRow], sweep: SweepConfig) -> TrialRow | None:
    scored = [r for r in rows if r.metric is not None and r.status != "error"]
    if not scored:
        return None
    sign = 1 if sweep.search.mode == "min" else -1
    return min(scored, key=lambda r: sign * (r.metric or 0.0))


def _write_best_config(
    sweep: SweepConfig, base: dict[str, Any], best: TrialRow, folder: str
) -> Path:
    """The best trial's architecture as a ready-to-run training config."""
    data = apply(base, best.overrides)
    data["io"] = {
        **data["io"],
        "name_model": f"{sweep.name}-best",
        "output_dir": str(Path(base["io"]["output_dir"]) / f"{sweep.name}-best"),
    }
    TrainEntryConfig.model_validate(data)  # it runs as written
    path = Path(folder) / "best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Best trial {best.trial_id} of sweep {sweep.name} ({sweep.source}): "
        f"{sweep.search.metric} {best.metric:.4f}\n# Train it: mblm train {path}\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False))
    tmp.replace(path)
    return path


__all__ = ["SweepResult", "TrialRow", "check", "tune_mblm"]
