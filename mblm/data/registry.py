"""Datasets by id: built-in byte corpora (read by Ray Data) and the seed's custom datasets."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from mblm.data.datasets import DistributedDataset

#: built-in corpora (see mblm.data.corpus): any files under a folder or glob, the PG19
#: layout, and the Python standard library's sources (present on every machine)
BUILT_IN = ("bytes", "pg19", "stdlib")

TDataset = TypeVar("TDataset", bound=type[DistributedDataset])


class DatasetRegistry:
    """``@dataset_registry.register("id")`` on a DistributedDataset subclass (seed API).

    A registered class must provide ``from_train_entry_config(config, mode, worker_id,
    num_workers)`` returning the worker's dataset, whose items are ``(inputs, loss_mask)``.
    """

    def __init__(self) -> None:
        self._custom: dict[str, type[DistributedDataset]] = {}

    def register(self, dataset_id: str) -> Callable[[TDataset], TDataset]:
        if dataset_id in BUILT_IN:
            raise ValueError(f"dataset id {dataset_id!r} is a built-in corpus; pick another id")

        def decorator(klass: TDataset) -> TDataset:
            if not (isinstance(klass, type) and issubclass(klass, DistributedDataset)):
                raise TypeError(f"{klass!r} is not a DistributedDataset subclass")
            if not callable(getattr(klass, "from_train_entry_config", None)):
                raise TypeError(f"{klass.__name__} needs a from_train_entry_config staticmethod")
            self._custom[dataset_id] = klass
            return klass

        return decorator

    def ids(self) -> list[str]:
        return sorted([*BUILT_IN, *self._custom])

    def is_built_in(self, dataset_id: str) -> bool:
        self.check(dataset_id)
        return dataset_id in BUILT_IN

    def check(self, dataset_id: str) -> None:
        if dataset_id not in BUILT_IN and dataset_id not in self._custom:
            raise ValueError(
                f"io.dataset_id: unknown dataset {dataset_id!r}; known: {', '.join(self.ids())}"
            )

    def retrieve(self, dataset_id: str) -> type[DistributedDataset]:
        self.check(dataset_id)
        if dataset_id in BUILT_IN:
            raise ValueError(f"{dataset_id!r} is a built-in corpus, read through Ray Data")
        return self._custom[dataset_id]


dataset_registry = DatasetRegistry()
