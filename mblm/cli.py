"""The ``mblm`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    result = train_mblm(config, address=args.address)
    print(f"MLflow run: {result.run_id}")
    print(
        f"tracking:   {result.tracking_uri}  (see it with: mlflow ui --backend-store-uri "
        f"{result.tracking_uri})"
    )
    if result.model_path:
        print(f"best model: {result.model_path}")
    return 0


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
    train.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value (repeatable), e.g. --set train.learning_rate=1e-3",
    )
    train.add_argument(
        "--address", help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )
    train.set_defaults(func=_train)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        print(f"mblm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
