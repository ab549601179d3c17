"""The ``mblm`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mblm.evaluate import add_parser as add_evaluate_parser
from mblm.generate_cli import add_parser as add_generate_parser


def _convert_reference(args: argparse.Namespace) -> int:
    from mblm.model.checkpoint import convert_reference_checkpoint, save_model

    ckpt = Path(args.checkpoint)
    config = Path(args.config) if args.config else ckpt.parent / "config.yaml"
    model = convert_reference_checkpoint(ckpt, config)
    out = save_model(model, args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({params:,} parameters, {model.num_stages} stages)")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mblm.train.config import load_train_config
    from mblm.train.run import train_mblm

    config = load_train_config(args.config, args.set)
    result = train_mblm(config, address=args.address, stop_after_steps=args.stop_after_steps)
    if result.stopped_early:
        print(f"stopped:    after step {result.step}/{result.total_steps}; run again to resume")
    print(f"MLflow run: {result.run_id}")
    print(
        f"tracking:   {result.tracking_uri}  (see it with: mlflow ui --backend-store-uri "
        f"{result.tracking_uri})"
    )
    if result.model_path:
        print(f"best model: {result.model_path}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from mblm.tune.config import load_sweep_config
    from mblm.tune.run import tune_mblm

    sweep = load_sweep_config(args.sweep, args.set)
    result = tune_mblm(sweep, address=args.address)
    print(f"MLflow parent run: {result.parent_run_id}")
    print(f"tracking:          {result.tracking_uri}")
    if result.best_config_path:
        print(f"best config:       {result.best_config_path}")
    return 0


def _tracking_uri(arg: str | None, store: str | None) -> str:
    import os

    if arg:
        return arg
    if store:
        path = Path(store)
        if path.suffix in (".yaml", ".yml"):
            from mblm.tracking.mlflow import resolve_tracking
            from mblm.train.config import load_train_config

            return resolve_tracking(load_train_config(path))[0]
        if not path.is_file():
            raise FileNotFoundError(f"MLflow store not found: {path}")
        return f"sqlite:///{path.resolve()}"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    raise ValueError("say which MLflow store: --tracking-uri URI, --store FILE.db or CONFIG.yaml")


def _compare(args: argparse.Namespace) -> int:
    from mblm.tracking.compare import compare, format_rows

    uri = _tracking_uri(args.tracking_uri, args.store)
    out = Path(args.out or f"compare-{args.target}.png")
    what, rows, png = compare(uri, args.target, out)
    print(f"{what}: {len(rows)} runs ({uri})")
    print(format_rows(rows))
    print(f"plot: {png}" if png else "plot: no run has validation metrics yet")
    return 0


def _ui(args: argparse.Namespace) -> int:
    import os
    import subprocess

    uri = _tracking_uri(None, args.store or "configs/quickstart.yaml")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise FileNotFoundError(f"no MLflow store yet at {uri}: train something first")
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", uri,
        "--host", "127.0.0.1",  # not reachable from other machines
        "--port", str(args.port),
        "--workers", "1",  # low memory: one server process
    ]  # fmt: skip
    print(f"MLflow UI for {uri} at http://127.0.0.1:{args.port} (Ctrl+C stops it)", flush=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 0


def _add_set_and_address(parser: argparse.ArgumentParser, set_help: str) -> None:
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE", help=set_help
    )
    parser.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mblm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser(
        "convert-reference",
        help="convert a checkpoint of the reference package (mblm 0.4.2) to our model file",
    )
    conv.add_argument("checkpoint", help="reference .pth holding {'MODEL': state_dict}")
    conv.add_argument(
        "--config", help="reference config.yaml (default: config.yaml next to the checkpoint)"
    )
    conv.add_argument("--out", required=True, help="where to write our model file (.pt)")
    conv.set_defaults(func=_convert_reference)

    train = sub.add_parser("train", help="train on Ray from a YAML config, tracked in MLflow")
    train.add_argument("config", help="training config (see configs/)")
    _add_set_and_address(train, "override a config value, e.g. --set train.learning_rate=1e-3")
    train.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="stop after optimizer step N with a checkpoint; the same command again resumes",
    )
    train.set_defaults(func=_train)

    tune = sub.add_parser(
        "tune", help="sweep architectures with Ray Tune (one MLflow child run per trial)"
    )
    tune.add_argument("sweep", help="sweep YAML (see configs/sweeps/)")
    _add_set_and_address(
        tune,
        "override a sweep value, e.g. --set search.num_samples=16 (io., train., params., ray., "
        "mlflow. paths go to the base config; space.SECTION.FIELD=VALUES to the space)",
    )
    tune.set_defaults(func=_tune)

    comp = sub.add_parser(
        "compare", help="table and plot of an experiment's runs or a sweep's trials"
    )
    comp.add_argument("target", help="MLflow experiment name, sweep name or sweep run id")
    comp.add_argument("--tracking-uri", help="default: MLFLOW_TRACKING_URI")
    comp.add_argument("--store", help="a local store: mlflow.db, or the training CONFIG.yaml")
    comp.add_argument("--out", help="plot file (default: compare-TARGET.png)")
    comp.set_defaults(func=_compare)

    ui = sub.add_parser("ui", help="the MLflow UI on 127.0.0.1 for a local store")
    ui.add_argument(
        "--store",
        help="mlflow.db or a training CONFIG.yaml (default: configs/quickstart.yaml's store)",
    )
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=_ui)
    add_generate_parser(sub)
    add_evaluate_parser(sub)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"mblm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mblm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
