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


def _demo(args: argparse.Namespace) -> int:
    from mblm.demo import run_demo

    run_demo(steps=args.steps, seconds=args.seconds, out_dir=Path(args.out))
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

    demo = sub.add_parser(
        "demo", help="train a small model on the bundled corpus for a short while, then sample"
    )
    demo.add_argument("--steps", type=int, default=400, help="training steps at most")
    demo.add_argument("--seconds", type=float, default=120.0, help="training time at most")
    demo.add_argument("--out", default="outputs/demo", help="output folder")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as err:
        print(f"mblm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
