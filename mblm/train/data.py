"""Batches for the loop: Ray Data shards of built-in corpora, or the seed's custom datasets."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from mblm.data.datasets import DistributedDataset
from mblm.data.types import ModelMode
from mblm.train.config import TrainEntryConfig
from mblm.train.plan import RunPlan

Batch = tuple[torch.Tensor, torch.Tensor]  # (ids (B, L) long, loss_mask (B, L) float)


def batches_for(
    cfg: TrainEntryConfig,
    plan: RunPlan,
    mode: ModelMode,
    skip: int = 0,
    dataset_class: type[DistributedDataset] | None = None,
) -> Iterator[Batch]:
    """Endless batches of this worker's shard (epoch after epoch), the first ``skip`` skipped.

    Every worker gets the same number of batches per epoch (equal shards, last partial
    batch dropped), so DDP never waits on a worker that ran out of data.
    """
    train = mode == ModelMode.TRAIN
    size = cfg.train.batch_size if train else plan.eval_batch_size
    shuffle = cfg.train.shuffle_train if train else cfg.train.shuffle_eval
    if dataset_class is None:
        source = _ray_batches(mode, size, shuffle, plan.seed)
    else:
        source = _custom_batches(dataset_class, cfg, mode, size, shuffle, plan.seed)
    return itertools.islice(source, skip, None)


def _ray_batches(mode: ModelMode, size: int, shuffle: bool, seed: int) -> Iterator[Batch]:
    import ray.train

    shard = ray.train.get_dataset_shard(mode.value)  # [ray] this worker's stream of windows
    for epoch in itertools.count():
        produced = False
        for batch in shard.iter_torch_batches(  # [ray]
            batch_size=size,
            drop_last=True,
            local_shuffle_buffer_size=size * 16 if shuffle else None,
            local_shuffle_seed=seed + epoch if shuffle else None,
        ):
            produced = True
            ids = batch["ids"].long()
            yield ids, torch.ones(ids.shape, dtype=torch.float32)
        if not produced:
            raise RuntimeError(f"the {mode.value} shard of this worker produced no batch")


def _custom_batches(
    klass: type[DistributedDataset],
    cfg: TrainEntryConfig,
    mode: ModelMode,
    size: int,
    shuffle: bool,
    seed: int,
) -> Iterator[Batch]:
    import ray.train

    ctx = ray.train.get_context()  # [ray]
    # the class travels in the payload: a dataset registered in the user's script is not
    # registered in the worker processes
    dataset = klass.from_train_entry_config(  # type: ignore[attr-defined]
        cfg, mode, ctx.get_world_rank(), ctx.get_world_size()
    )
    for epoch in itertools.count():
        gen = torch.Generator().manual_seed(seed + epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=size, shuffle=shuffle, drop_last=True, generator=gen
        )
        produced = False
        for inputs, loss_mask in loader:
            produced = True
            yield inputs.long(), loss_mask.float()
        if not produced:
            raise RuntimeError(f"the {mode.value} dataset of this worker produced no batch")
