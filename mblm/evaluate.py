"""``mblm evaluate``: bits per byte of a trained model on a split of a training config's corpus.

The windows stream through Ray Data (the same corpus, split and window length as training);
the model runs in this process on ``--device``. With an MLflow run as the checkpoint, the
result is logged to that run as ``eval_<split>_loss`` / ``eval_<split>_bpb``.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mblm.data.types import ModelMode

SPLITS = {"train": ModelMode.TRAIN, "valid": ModelMode.VALID, "test": ModelMode.TEST}


@dataclass
class EvalResult:
    split: str
    windows: int
    loss: float  # mean cross-entropy per byte (nats)
    bytes_per_second: float

    @property
    def bpb(self) -> float:
        return self.loss / math.log(2)


def evaluate_model(model: Any, batches: Any, device: str) -> tuple[float, int, float]:
    """(mean loss per byte, windows, seconds) over ``batches`` of byte ids (B, L)."""
    import torch

    model.eval().to(device)
    total, count, windows = 0.0, 0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for ids in batches:
            ids = ids.to(device).long()
            loss = model(ids)  # mean over the bytes of the batch
            total += float(loss) * ids.numel()
            count += ids.numel()
            windows += ids.shape[0]
    return total / max(count, 1), windows, time.perf_counter() - start


def run(args: argparse.Namespace) -> int:
    import ray

    from mblm.data.corpus import open_corpus
    from mblm.data.registry import dataset_registry
    from mblm.generate_cli import RUN_ID, resolve_checkpoint
    from mblm.model.checkpoint import load_model
    from mblm.train.config import load_train_config

    for name in ("batch_size", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    cfg = load_train_config(args.config, args.set)
    if not dataset_registry.is_built_in(cfg.io.dataset_id):
        raise ValueError(
            f"io.dataset_id: mblm evaluate reads the built-in corpora (bytes, pg19, stdlib), "
            f"got {cfg.io.dataset_id!r}"
        )
    corpus = open_corpus(
        cfg.io.dataset_id, cfg.io.dataset_dir, cfg.params.input_seq_len, SPLITS[args.split]
    )
    if corpus.num_windows == 0:
        raise ValueError(f"the {args.split} split of {cfg.io.dataset_dir} has no window")
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(resolve_checkpoint(args.checkpoint, args.tracking_uri, Path(tmp)))
    if model.max_seq_len < cfg.params.input_seq_len:
        raise ValueError(
            f"params.input_seq_len={cfg.params.input_seq_len} is longer than the model's "
            f"context {model.max_seq_len}"
        )
    if not ray.is_initialized():  # RAY_ADDRESS (a job on a cluster), else a new local Ray
        address = os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    dataset = corpus.to_ray_dataset()  # [ray] windows streamed by Ray Data
    if args.max_windows is not None:
        dataset = dataset.limit(args.max_windows)  # the stream ends there: no reader left over
    batches = (b["ids"] for b in dataset.iter_torch_batches(batch_size=args.batch_size))
    try:
        loss, windows, seconds = evaluate_model(model, batches, args.device)
    finally:
        batches.close()  # stops Ray Data's executor before anyone shuts Ray down
    result = EvalResult(args.split, windows, loss, windows * cfg.params.input_seq_len / seconds)
    print(
        f"{args.split}: {result.bpb:.4f} bits/byte (loss {loss:.4f}) over {windows:,} windows "
        f"of {cfg.params.input_seq_len} bytes, {result.bytes_per_second:,.0f} bytes/s"
    )
    if RUN_ID.fullmatch(args.checkpoint) or args.checkpoint.startswith("runs:/"):
        from mlflow.tracking import MlflowClient

        run_id = args.checkpoint.removeprefix("runs:/").split("/")[0]
        client = MlflowClient(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        client.log_metric(run_id, f"eval_{args.split}_loss", loss)
        client.log_metric(run_id, f"eval_{args.split}_bpb", result.bpb)
        print(f"logged eval_{args.split}_bpb to MLflow run {run_id}")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="bits per byte of a trained model on a split of a config's corpus"
    )
    p.add_argument("config", help="training config: its corpus, split and window length")
    p.add_argument(
        "--checkpoint", required=True, metavar="PATH_OR_RUN",
        help="model file, MLflow run id or runs:/<id>/model.pt",
    )  # fmt: skip
    p.add_argument("--split", choices=sorted(SPLITS), default="test")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-windows", type=int, help="evaluate at most this many windows")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--tracking-uri", help="for a run id (default: MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="override a config value, e.g. --set io.dataset_dir=/data/pg19",
    )  # fmt: skip
    p.set_defaults(func=run)
    return p
