"""The seed's ``DistributedDataset``: a map-style dataset split evenly across workers.

Each of ``num_workers`` workers sees a contiguous, equally long slice of the data, so every
worker produces the same number of samples (uneven shards would hang DDP). Sequential
datasets return windows of ``seq_len`` elements starting at ``idx * seq_len`` within the
worker's slice, shifted by ``sample_offset`` (see :meth:`offset_to`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypedDict, TypeVar

from typing_extensions import Unpack

_T = TypeVar("_T")


class DistributedDatasetConfig(TypedDict):
    seq_len: int
    worker_id: int
    num_workers: int


class DistributedDataset(ABC, Generic[_T]):
    """Subclass it, implement :meth:`get_sample`, and register it in ``dataset_registry``."""

    def __init__(
        self, data_size: int, is_sequential: bool, **kwargs: Unpack[DistributedDatasetConfig]
    ):
        seq_len, worker_id, num_workers = (
            kwargs["seq_len"],
            kwargs["worker_id"],
            kwargs["num_workers"],
        )
        if num_workers <= 0:
            raise ValueError(f"num_workers must be positive, got {num_workers}")
        if not 0 <= worker_id < num_workers:
            raise ValueError(
                f"worker_id must be in [0, num_workers={num_workers}), got {worker_id}"
            )
        if seq_len <= 0:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        per_worker = data_size // num_workers
        needed = seq_len if is_sequential else 1
        if per_worker < needed:
            raise ValueError(
                f"dataset too small: {data_size} elements over {num_workers} workers leaves "
                f"{per_worker} per worker, fewer than one sample ({needed})"
            )
        self.is_sequential = is_sequential
        self.seq_len = seq_len
        self.sample_offset = 0
        self._start = worker_id * per_worker
        self._per_worker = per_worker

    def offset_to(self, offset: int) -> DistributedDataset[_T]:
        """Shift where sequential windows start (modulo ``seq_len``); no effect otherwise."""
        if self.is_sequential:
            self.sample_offset = offset % self.seq_len
        return self

    def offset_one(self) -> DistributedDataset[_T]:
        return self.offset_to(self.sample_offset + 1)

    @abstractmethod
    def get_sample(self, from_idx: int) -> _T:
        """The sample starting at absolute index ``from_idx`` (a window if sequential)."""

    def __len__(self) -> int:
        if self.is_sequential:
            return max((self._per_worker - self.sample_offset) // self.seq_len, 0)
        return self._per_worker

    def __getitem__(self, idx: int) -> _T:
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} samples")
        step = self.seq_len if self.is_sequential else 1
        return self.get_sample(self._start + idx * step + self.sample_offset)

    @staticmethod
    def supports_test_mode() -> bool:
        """Whether the dataset has a test split to evaluate on at the end of training."""
        return True
