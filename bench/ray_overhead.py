"""Ray's cost: the Ray Train loop (1 worker) against a plain PyTorch loop, and Ray Data ingest.

1. Time per optimizer step of the same model and config (configs/quickstart.yaml, 1 worker)
   trained (a) by ``mblm train`` on a local Ray (Ray Data shards, Ray Train worker, MLflow)
   and (b) by a plain in-process PyTorch loop on windows of the same corpus held in memory.
   Rounds alternate (plain, Ray, plain, Ray ...). The Ray step time is read from the
   timestamps of MLflow's train-loss points between the first and last log point (steady
   state: no validation in between, startup excluded).
2. Ingest: the Ray Data pipeline alone (read, window, iterate torch batches) in bytes/s,
   against the bytes/s the model consumes in the plain loop.

Usage: python bench/ray_overhead.py [--rounds 2] [--steps 60]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
THREADS = 2


def load(steps: int, out: Path):
    from mblm.train.config import load_train_config

    per_step = 4 * 512
    return load_train_config(
        CONFIG,
        [
            f"io.output_dir={out}",
            "ray.num_workers=1",
            f"ray.cpus_per_worker={THREADS}",
            f"train.target_elements={steps * per_step}",
            "io.validate_amount=1",
            "io.num_models_to_save=1",
            f"io.log_train_loss_amount={steps // 5}",
            "train.max_eval_steps=1",
        ],
    )


def plain_loop(steps: int) -> float:
    """Median seconds per step of a plain PyTorch loop (same model, optimizer, batch)."""
    from mblm import MBLM
    from mblm.data.corpus import open_corpus
    from mblm.data.types import ModelMode
    from mblm.train.loop import warmup_cosine

    cfg = load(steps, Path(tempfile.mkdtemp()))
    torch.set_num_threads(THREADS)
    corpus = open_corpus("stdlib", "stdlib", cfg.params.input_seq_len, ModelMode.TRAIN)
    windows = [
        torch.from_numpy(w.copy())
        for p in corpus.files[:60]
        for w in corpus.windows(str(p), p.read_bytes())
    ]
    torch.manual_seed(0)
    model = MBLM(cfg.params.model_config_only()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps, steps // 20))
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        idx = torch.randint(0, len(windows), (cfg.train.batch_size,), generator=gen)
        ids = torch.stack([windows[j] for j in idx]).long()
        loss = model(ids, loss_mask=torch.ones(ids.shape))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.gradient_clipping or math.inf)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if i >= 5:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def ray_loop(steps: int) -> float:
    """Seconds per step of `mblm train` (1 worker), from MLflow's log-point timestamps."""
    import ray
    from mlflow.tracking import MlflowClient

    from mblm.train.run import train_mblm

    out = Path(tempfile.mkdtemp())
    cfg = load(steps, out)
    try:
        result = train_mblm(cfg)
    finally:
        ray.shutdown()
    hist = MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "train_loss")
    hist = sorted(hist, key=lambda m: m.step)
    first, last = hist[1], hist[-2]  # skip the first (startup) and last (validation after)
    return (last.timestamp - first.timestamp) / 1000 / (last.step - first.step)


def ingest(batches: int) -> float:
    """Bytes/s of the Ray Data pipeline alone: read, window, iterate torch batches."""
    import ray

    from mblm.data.corpus import open_corpus
    from mblm.data.types import ModelMode

    ray.init(include_dashboard=False)
    try:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False
        corpus = open_corpus("stdlib", "stdlib", 512, ModelMode.TRAIN)
        ds = corpus.to_ray_dataset()
        it = iter(ds.iter_torch_batches(batch_size=4, drop_last=True))  # a generator
        next(it)  # pipeline startup
        t, n = time.perf_counter(), 0
        for batch in it:
            n += batch["ids"].numel()
            if n >= batches * 4 * 512:
                break
        rate = n / (time.perf_counter() - t)
        it.close()  # stop the stream before Ray shuts down
        return rate
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    plain, ray_t = [], []
    for r in range(args.rounds):
        plain.append(plain_loop(args.steps))
        ray_t.append(ray_loop(args.steps))
        print(
            f"[bench] round {r}: plain {plain[-1]:.4f} s/step, Ray {ray_t[-1]:.4f} s/step",
            file=sys.stderr,
        )
    p, q = statistics.median(plain), statistics.median(ray_t)
    bytes_per_step = 4 * 512
    data_rate = ingest(400)
    model_rate = bytes_per_step / p
    lines = [
        "# Ray's cost and Ray Data ingest",
        "",
        f"- command: `python bench/ray_overhead.py --rounds {args.rounds} --steps {args.steps}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- model: configs/quickstart.yaml, 1 worker, {THREADS} torch threads, batch 4 x 512",
        "",
        "| measure | value | target |",
        "|---|---:|---|",
        f"| plain PyTorch loop, s/step (median of rounds) | {p:.4f} | |",
        f"| Ray Train loop, s/step (median of rounds) | {q:.4f} | |",
        f"| Ray / plain | **{q / p:.2f}x** | <= 1.10x |",
        f"| Ray Data pipeline alone, bytes/s | {data_rate:,.0f} | |",
        f"| bytes/s the model consumes (plain loop) | {model_rate:,.0f} | |",
        f"| ingest / consumption | **{data_rate / model_rate:.1f}x** | >= 10x |",
        "",
        "Per round (plain, Ray) s/step: "
        + ", ".join(f"({a:.4f}, {b:.4f})" for a, b in zip(plain, ray_t, strict=True)),
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ray_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
