"""What a run will do, computed on the driver before any compute: steps, logging points, data."""

from __future__ import annotations

import math

from pydantic import BaseModel

from mblm.train.config import TrainEntryConfig


class RunPlan(BaseModel):
    """Derived, fixed numbers of a run; every worker follows the same plan."""

    world_size: int
    micro_batches: int  # per worker, over the whole run
    total_steps: int  # optimizer steps
    warmup_steps: int
    log_steps: list[int]  # optimizer steps after which the train loss is logged
    valid_steps: list[int]  # optimizer steps after which the model is validated
    eval_batch_size: int
    eval_batches: int  # validation batches per worker per validation
    test_batches: int  # test batches per worker at the end (0: no test split)
    bytes_per_step: int  # bytes trained on per optimizer step, over all workers
    seed: int = 0


def spread(total: int, amount: int) -> list[int]:
    """``amount`` steps spread evenly over 1..total, always including the last."""
    amount = max(1, min(amount, total))
    return sorted({math.ceil(total * (i + 1) / amount) for i in range(amount)})


def make_plan(
    cfg: TrainEntryConfig, valid_windows: int, test_windows: int, seed: int = 0
) -> RunPlan:
    """Turn the config's budget into steps. Errors name the field and the numbers."""
    world = cfg.ray.num_workers
    t = cfg.train
    per_sequence = cfg.params.input_seq_len if t.target_elements_strategy == "sequence" else 1
    per_micro = t.batch_size * world * per_sequence
    micro = max(math.ceil(t.target_elements / per_micro), 1)
    steps = max(math.ceil(micro / t.gradient_accumulate_every), 1)
    micro = steps * t.gradient_accumulate_every
    if valid_windows < world:
        raise ValueError(
            f"the validation split has {valid_windows} windows, fewer than "
            f"ray.num_workers={world}: use a larger corpus or a smaller input_seq_len"
        )
    eval_bs = min(t.batch_size, valid_windows // world)
    eval_batches = valid_windows // world // eval_bs
    if t.max_eval_steps is not None:
        eval_batches = min(eval_batches, t.max_eval_steps)
    test_bs_batches = (test_windows // world // eval_bs) if test_windows >= world else 0
    if t.max_eval_steps is not None:
        test_bs_batches = min(test_bs_batches, t.max_eval_steps)
    return RunPlan(
        world_size=world,
        micro_batches=micro,
        total_steps=steps,
        warmup_steps=int(steps * t.warmup_steps_perc),
        log_steps=spread(steps, cfg.io.log_train_loss_amount),
        valid_steps=spread(steps, cfg.io.validate_amount),
        eval_batch_size=eval_bs,
        eval_batches=eval_batches,
        test_batches=test_bs_batches,
        bytes_per_step=t.batch_size
        * t.gradient_accumulate_every
        * world
        * cfg.params.input_seq_len,
        seed=seed,
    )
