"""Side-by-side comparison of runs: a table and a plot of validation bits per byte.

``mblm compare EXPERIMENT_OR_SWEEP``: an experiment name gives every training run and trial
in it; a sweep (its name or its parent run id) gives its trials.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RunRow:
    run_id: str
    name: str
    kind: str  # train | trial
    architecture: str
    num_params: str
    best_valid_bpb: float | None
    bytes_per_second: float | None
    bytes_seen: float | None
    status: str


def find_runs(client: Any, target: str) -> tuple[str, list[Any], str | None]:
    """(what was found, its training runs, the sweep's parent run id if a sweep)."""
    from mlflow.exceptions import MlflowException

    exps = client.search_experiments()
    ids = [e.experiment_id for e in exps]
    # a sweep's parent run id
    try:
        run = client.get_run(target)
        if run.data.tags.get("mblm.kind") == "sweep":
            return (
                f"sweep {run.data.tags.get('mblm.sweep')}",
                _children(client, run),
                run.info.run_id,
            )
    except MlflowException:
        pass
    # a sweep name: its latest parent run
    if ids:
        parents = client.search_runs(
            ids,
            filter_string=f"tags.`mblm.kind` = 'sweep' and tags.`mblm.sweep` = '{target}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if parents:
            return f"sweep {target}", _children(client, parents[0]), parents[0].info.run_id
    exp = client.get_experiment_by_name(target)
    if exp is not None:
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string="tags.`mblm.kind` != 'sweep'",
            order_by=["attributes.start_time ASC"],
            max_results=10000,
        )
        return f"experiment {target}", runs, None
    names = ", ".join(sorted(e.name for e in exps)) or "none"
    raise ValueError(
        f"{target!r} is neither an MLflow experiment nor a sweep (name or parent run id) in "
        f"this tracking store (experiments: {names})"
    )


def _children(client: Any, parent: Any) -> list[Any]:
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mblm.sweep_run_id` = '{parent.info.run_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=10000,
        )
    )


def rows_for(client: Any, runs: list[Any]) -> list[RunRow]:
    rows = []
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        valid = [m.value for m in client.get_metric_history(run.info.run_id, "valid_bpb")]
        arch = tags.get("mblm.architecture") or (
            f"seq_lens={params.get('params.seq_lens', '?')} "
            f"dims={params.get('params.hidden_dims', '?')} "
            f"layers={params.get('params.num_layers', '?')}"
        )
        status = run.info.status
        if tags.get("mblm.early_stopped") == "true":
            status = "STOPPED EARLY"
        rows.append(
            RunRow(
                run_id=run.info.run_id,
                name=run.info.run_name or run.info.run_id[:8],
                kind=tags.get("mblm.kind", "?"),
                architecture=arch,
                num_params=tags.get("mblm.num_params", "?"),
                best_valid_bpb=min(valid) if valid else None,
                bytes_per_second=metrics.get("bytes_per_second"),
                bytes_seen=metrics.get("bytes_seen"),
                status=status,
            )
        )
    return rows


def format_rows(rows: list[RunRow]) -> str:
    lines = [
        "| run | kind | architecture | params | best valid bpb | bytes/s | bytes seen | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        bpb = f"{r.best_valid_bpb:.4f}" if r.best_valid_bpb is not None else "-"
        rate = f"{r.bytes_per_second:,.0f}" if r.bytes_per_second else "-"
        seen = f"{r.bytes_seen:,.0f}" if r.bytes_seen else "-"
        lines.append(
            f"| {r.name} | {r.kind} | {r.architecture} | {r.num_params} | {bpb} | {rate} | "
            f"{seen} | {r.status} |"
        )
    return "\n".join(lines)


def plot_runs(client: Any, runs: list[Any], out: Path, title: str = "") -> Path | None:
    """Validation bits per byte against bytes seen, one line per run; None if no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = 0
    for run in runs:
        rid = run.info.run_id
        valid = {m.step: m.value for m in client.get_metric_history(rid, "valid_bpb")}
        seen = {m.step: m.value for m in client.get_metric_history(rid, "bytes_seen")}
        steps = sorted(s for s in valid if s in seen)
        if not steps:
            continue
        label = run.info.run_name or rid[:8]
        ax.plot([seen[s] for s in steps], [valid[s] for s in steps], marker="o", label=label)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("bytes seen")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title or "validation bits per byte")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def compare(tracking_uri: str, target: str, out: Path) -> tuple[str, list[RunRow], Path | None]:
    """The table of ``target``'s runs and their plot at ``out`` (also logged to a sweep)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    what, runs, parent = find_runs(client, target)
    rows = rows_for(client, runs)
    png = plot_runs(client, runs, out, title=what)
    if png is not None and parent is not None:
        try:  # a copy on the sweep's parent run; reading must work without write access
            client.log_artifact(parent, str(png))
        except Exception as err:
            warnings.warn(f"could not log the plot to run {parent}: {err}", stacklevel=2)
    return what, rows, png
