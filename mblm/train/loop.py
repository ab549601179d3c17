"""The per-worker training loop: a plain PyTorch loop. Ray calls are marked ``# [ray]``.

Every worker runs :func:`train_loop_per_worker` with the same payload (the validated config,
the run plan, the MLflow run id). Rank 0 alone logs to MLflow, prints progress and writes
checkpoints; every rank calls ``ray.train.report`` the same number of times.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mblm.data.types import ModelMode
from mblm.model.mblm import MBLM
from mblm.train.checkpoint import load_training_state, save_training_state
from mblm.train.config import TrainEntryConfig
from mblm.train.data import batches_for
from mblm.train.plan import RunPlan

LN2 = math.log(2)


def warmup_cosine(total: int, warmup: int):
    """LR factor: linear warmup to 1, then cosine to 0 at ``total`` steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    count: int,
    device: torch.device,
    amp: Any,
) -> float:
    """Mean loss over ``count`` batches on every worker, reduced across workers."""
    model.eval()
    total, weight = 0.0, 0.0
    for _ in range(count):
        ids, mask = next(batches)
        with amp:
            loss = model(ids.to(device), loss_mask=mask.to(device))
        total += float(loss) * ids.numel()
        weight += ids.numel()
    model.train()
    total, weight = _all_reduce_sum([total, weight], device)
    return total / max(weight, 1.0)


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = TrainEntryConfig.model_validate(payload["config"])
    plan = RunPlan.model_validate(payload["plan"])
    ctx = ray.train.get_context()  # [ray]
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()  # [ray]
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    amp: Any = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    tracker = None
    if rank == 0 and payload.get("mlflow_run_id"):
        from mblm.tracking.mlflow import RunLogger

        tracker = RunLogger(payload["mlflow_tracking_uri"], payload["mlflow_run_id"])

    torch.manual_seed(plan.seed)
    model = MBLM(cfg.params.model_config_only())
    ddp = ray.train.torch.prepare_model(model)  # [ray] DDP over gloo/nccl, moved to device
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.learning_rate, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(plan.total_steps, plan.warmup_steps)
    )

    step = 0
    checkpoint = ray.train.get_checkpoint()  # [ray] resume from the latest checkpoint
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            step = load_training_state(Path(folder), model, opt, sched)
        if rank == 0:
            print(f"[mblm] resumed at step {step}/{plan.total_steps}", flush=True)

    accum = cfg.train.gradient_accumulate_every
    klass = payload.get("dataset_class")
    train_batches = batches_for(cfg, plan, ModelMode.TRAIN, skip=step * accum, dataset_class=klass)
    t_start, bytes_this_call = time.perf_counter(), 0
    start_step = step
    # stop here (with a checkpoint) when asked to; running again resumes
    last = min(plan.total_steps, payload.get("stop_after_steps") or plan.total_steps)
    while step < last:
        loss_sum = torch.zeros((), device=device)  # stays on the device: no sync per step
        for micro in range(accum):
            ids, mask = next(train_batches)
            ids, mask = ids.to(device), mask.to(device)
            # no gradient all-reduce on non-final micro-batches
            sync = contextlib.nullcontext() if micro == accum - 1 else _no_sync(ddp)
            with sync, amp:
                loss = ddp(ids, loss_mask=mask) / accum
            with sync:
                loss.backward()
            loss_sum += loss.detach()
            bytes_this_call += ids.numel() * plan.world_size
        clip = cfg.train.gradient_clipping or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1

        metrics: dict[str, float] = {}
        checkpoint_now = step in plan.valid_steps or step == last
        elapsed = time.perf_counter() - t_start
        rate = bytes_this_call / max(elapsed, 1e-9)
        if step in plan.log_steps or checkpoint_now:
            metrics.update(bytes_seen=float(step * plan.bytes_per_step), bytes_per_second=rate)
        if step in plan.log_steps:
            train_loss = float(loss_sum)
            metrics.update(
                train_loss=train_loss,
                train_bpb=train_loss / LN2,
                lr=float(sched.get_last_lr()[0]),
                grad_norm=float(grad_norm),
            )
            if rank == 0:
                left = (plan.total_steps - step) * elapsed / max(step - start_step, 1)
                print(
                    f"[mblm] step {step}/{plan.total_steps} loss {train_loss:.4f} "
                    f"({train_loss / LN2:.3f} bits/byte) {rate:,.0f} bytes/s, "
                    f"{left:,.0f} s left",
                    flush=True,
                )
        if checkpoint_now:
            valid_batches = batches_for(cfg, plan, ModelMode.VALID, dataset_class=klass)
            valid = evaluate(ddp, valid_batches, plan.eval_batches, device, amp)
            metrics.update(valid_loss=valid, valid_bpb=valid / LN2)
            if rank == 0:
                print(f"[mblm] step {step}: valid {valid / LN2:.4f} bits/byte", flush=True)
        if tracker is not None and metrics:
            tracker.log_metrics(metrics, step)
        if checkpoint_now:
            validation = bisect.bisect_right(plan.valid_steps, step)  # validations so far
            _report(step, plan.total_steps, validation, metrics, rank, model, opt, sched)

    if step < plan.total_steps:
        if rank == 0:
            print(f"[mblm] stopping after step {step}/{plan.total_steps} as asked", flush=True)
        return
    if plan.test_batches:
        test_batches = batches_for(cfg, plan, ModelMode.TEST, dataset_class=klass)
        test = evaluate(ddp, test_batches, plan.test_batches, device, amp)
        if rank == 0:
            print(f"[mblm] test {test / LN2:.4f} bits/byte", flush=True)
        if tracker is not None:
            tracker.log_metrics({"test_loss": test, "test_bpb": test / LN2}, step)


def _no_sync(ddp: torch.nn.Module) -> contextlib.AbstractContextManager[Any]:
    no_sync = getattr(ddp, "no_sync", None)
    return no_sync() if callable(no_sync) else contextlib.nullcontext()


def _report(
    step: int,
    total_steps: int,
    validation: int,
    metrics: dict[str, float],
    rank: int,
    model: MBLM,
    opt: torch.optim.Optimizer,
    sched: Any,
) -> None:
    """Every rank reports; rank 0 attaches the checkpoint (written atomically first)."""
    import ray.train

    report = {"step": step, "total_steps": total_steps, "validation": validation, **metrics}
    if rank != 0:
        ray.train.report(report)  # [ray]
        return
    with tempfile.TemporaryDirectory(prefix="mblm-ckpt-") as folder:
        save_training_state(Path(folder), model, opt, sched, step)
        ray.train.report(  # [ray] persisted to the run's storage
            report, checkpoint=ray.train.Checkpoint.from_directory(folder)
        )
