"""``mblm generate``: sample bytes from a trained model, streamed to stdout as UTF-8.

The model comes from a model file (``mblm train`` writes ``OUTPUT_DIR/model.pt``) or from an
MLflow run that logged one (a run id, or ``runs:/<run id>/model.pt``; the tracking server is
``--tracking-uri``, else ``MLFLOW_TRACKING_URI``). mlflow is only imported for a run.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

RUN_ID = re.compile(r"[0-9a-f]{32}")

DESCRIPTION = """\
Sample bytes from a trained model and stream them to stdout, decoded as UTF-8.

--checkpoint is a model file (mblm train writes OUTPUT_DIR/model.pt), an MLflow run id
whose run logged model.pt, or runs:/<run id>/model.pt (MLflow: --tracking-uri, else
MLFLOW_TRACKING_URI). Decoding is greedy unless --top-k, --filter-thres or --top-p is given.
"""


class _FlushEachWrite:
    """A text stream wrapper that flushes after every write, so bytes show as they come."""

    def __init__(self, stream: IO[str]):
        self._stream = stream

    def write(self, text: str) -> int:
        n = self._stream.write(text)
        self._stream.flush()
        return n

    def flush(self) -> None:
        self._stream.flush()


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``generate`` on the ``mblm`` command's subparsers."""
    p = subparsers.add_parser(
        "generate",
        help="generate bytes from a trained model, streamed to stdout as UTF-8",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: mblm generate --checkpoint data/outputs/model.pt --prompt 'Once' "
        "--top-p 0.9 --seed 0",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH_OR_RUN",
        help="model file (e.g. OUTPUT_DIR/model.pt), MLflow run id, or runs:/<id>/model.pt",
    )
    p.add_argument("--prompt", default="", help="text to continue (UTF-8; default: none)")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=None,
        help="bytes to generate (default: fill the model's context after the prompt)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="> 0 (default 1.0)")
    top = p.add_mutually_exclusive_group()
    top.add_argument("--top-k", type=int, help="sample from the K most likely bytes")
    top.add_argument(
        "--filter-thres",
        type=float,
        help="the seed's top-k: keep the top (1 - F) of the vocabulary; 1.0 is greedy",
    )
    p.add_argument(
        "--top-p", type=float, help="nucleus sampling: the likeliest bytes holding mass P"
    )
    p.add_argument("--seed", type=int, help="seed of the sampling noise (reproducible output)")
    p.add_argument(
        "--end-token", type=int, default=-1, help="stop after generating this id (default: none)"
    )
    p.add_argument(
        "--no-cache", action="store_true", help="recompute the whole model for every byte"
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the output")
    p.add_argument(
        "--stats", action="store_true", help="print bytes and bytes/s to stderr at the end"
    )
    p.set_defaults(func=run)
    return p


def resolve_checkpoint(checkpoint: str, tracking_uri: str | None, workdir: Path) -> Path:
    """A local model file for ``checkpoint``: the path itself, or the ``model.pt`` of an
    MLflow run downloaded into ``workdir``."""
    path = Path(checkpoint)
    if path.is_file():
        return path
    if checkpoint.startswith("runs:/"):
        return _download(checkpoint, None, tracking_uri, workdir)
    if RUN_ID.fullmatch(checkpoint) and not path.exists():
        return _download(None, checkpoint, tracking_uri, workdir)
    raise FileNotFoundError(
        f"model file not found: {checkpoint} (give a model file, an MLflow run id or "
        "runs:/<run id>/model.pt)"
    )


def _download(uri: str | None, run_id: str | None, tracking_uri: str | None, workdir: Path) -> Path:
    uri_or_run = uri or f"run {run_id}"
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking_uri:
        raise ValueError(f"{uri_or_run}: an MLflow run needs --tracking-uri or MLFLOW_TRACKING_URI")
    # a CLI process: no download bar for one file on stderr
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow
    from mlflow.exceptions import MlflowException

    def first_line(err: Exception) -> str:
        return str(getattr(err, "message", err)).splitlines()[0]

    if run_id is not None:
        try:
            mlflow.MlflowClient(tracking_uri).get_run(run_id)
        except MlflowException as err:
            raise ValueError(f"{uri_or_run} in {tracking_uri}: {first_line(err)}") from None
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri,
            run_id=run_id,
            artifact_path="model.pt" if run_id is not None else None,
            dst_path=str(workdir),
            tracking_uri=tracking_uri,
        )
    except (MlflowException, OSError) as err:
        raise ValueError(
            f"{uri_or_run} in {tracking_uri}: no model.pt artifact ({first_line(err)})"
        ) from None
    found = Path(local)
    if found.is_dir():
        found = found / "model.pt"
    if not found.is_file():
        raise ValueError(f"{uri_or_run} in {tracking_uri}: no model.pt artifact")
    return found


def run(args: argparse.Namespace) -> int:
    import torch

    from mblm.model.checkpoint import load_model
    from mblm.utils.stream import ByteStreamer

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available")
    if args.max_bytes is not None and args.max_bytes < 0:
        raise ValueError(f"--max-bytes must be >= 0, got {args.max_bytes}")

    with tempfile.TemporaryDirectory(prefix="mblm-generate-") as tmp:
        path = resolve_checkpoint(args.checkpoint, args.tracking_uri, Path(tmp))
        model = load_model(path, map_location=device).eval()

    prompt = args.prompt.encode("utf-8")
    if len(prompt) >= model.max_seq_len and (args.max_bytes is None or args.max_bytes > 0):
        raise ValueError(
            f"the prompt is {len(prompt)} bytes: the model's context is {model.max_seq_len} "
            "bytes, which leaves no room to generate"
        )
    prime = torch.tensor(list(prompt), dtype=torch.long)
    out = _FlushEachWrite(sys.stdout)
    if args.echo:
        out.write(args.prompt)
    t0 = time.perf_counter()
    try:
        with ByteStreamer(out, decode_utf8=True) as streamer:  # type: ignore[arg-type]
            ids = model.generate(
                prime,
                stream=streamer,
                num_tokens_to_generate=args.max_bytes,
                end_of_gen_token_id=args.end_token,
                temperature=args.temperature,
                filter_thres=args.filter_thres,
                enable_progress=False,
                top_k=args.top_k,
                top_p=args.top_p,
                use_cache=not args.no_cache,
                seed=args.seed,
            )
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    if sys.stdout.isatty():
        out.write("\n")
    if args.stats:
        n, dt = len(ids) - len(prompt), time.perf_counter() - t0
        print(f"[mblm] {n} bytes in {dt:.2f} s ({n / dt:,.0f} bytes/s)", file=sys.stderr)
    return 0
