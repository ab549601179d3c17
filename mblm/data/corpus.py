"""Byte corpora as Ray Data pipelines: files -> fixed windows -> train/valid/test splits.

A corpus is a list of files. Every file is cut into non-overlapping windows of
``seq_len`` bytes (a tail shorter than a window is dropped). Which split a window belongs to
is decided by a hash of ``(file path relative to the corpus root, offset)``, or by folder for
the PG19 layout, so splits are deterministic and computable from file sizes alone: the
number of windows of each split is known before any byte is read, which is how bad input
(an empty folder, a corpus shorter than one window) is reported before compute is spent.

Files are read as a stream by Ray Data (``read_binary_files``): neither the driver nor any
worker holds the whole corpus in memory.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mblm.data.types import ModelMode

if TYPE_CHECKING:
    import ray.data

#: share of windows per split for corpora without split folders (per mille)
SPLIT_PER_MILLE = {
    ModelMode.TRAIN: (0, 900),
    ModelMode.VALID: (900, 950),
    ModelMode.TEST: (950, 1000),
}
PG19_FOLDERS = {ModelMode.TRAIN: "train", ModelMode.VALID: "validation", ModelMode.TEST: "test"}


def window_split(rel_path: str, offset: int) -> ModelMode:
    """The split of the window at ``offset`` of file ``rel_path`` (hash split)."""
    bucket = zlib.crc32(f"{rel_path}:{offset}".encode()) % 1000
    for mode, (lo, hi) in SPLIT_PER_MILLE.items():
        if lo <= bucket < hi:
            return mode
    raise AssertionError(bucket)


@dataclass(frozen=True)
class Corpus:
    """Files of one split of a corpus and how its windows are chosen."""

    root: Path
    files: tuple[Path, ...]
    seq_len: int
    mode: ModelMode
    hash_split: bool  # False: every window of these files belongs to ``mode``

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if self.root in path.parents else path.name

    def offsets(self, path: Path, size: int) -> list[int]:
        """Window offsets of ``path`` (of ``size`` bytes) that belong to this split."""
        starts = range(0, size - self.seq_len + 1, self.seq_len)
        if not self.hash_split:
            return list(starts)
        rel = self._rel(path)
        return [o for o in starts if window_split(rel, o) == self.mode]

    @cached_property
    def num_windows(self) -> int:
        """Windows of this split (from file sizes; computed once)."""
        return sum(len(self.offsets(p, p.stat().st_size)) for p in self.files)

    def windows(self, path: str, data: bytes) -> Iterator[np.ndarray]:
        for o in self.offsets(Path(path), len(data)):
            yield np.frombuffer(data, dtype=np.uint8, count=self.seq_len, offset=o)

    def to_ray_dataset(self) -> ray.data.Dataset:
        """A streaming Ray dataset of rows ``{"ids": uint8[seq_len]}``."""
        import ray.data

        corpus = self

        def to_windows(row: dict[str, Any]) -> list[dict[str, Any]]:
            return [{"ids": w} for w in corpus.windows(row["path"], row["bytes"])]

        paths = [str(p) for p in self.files]
        ds = ray.data.read_binary_files(paths, include_paths=True)
        return ds.flat_map(to_windows)


def _list_files(spec: str) -> tuple[Path, list[Path]]:
    """A folder (all regular, non-hidden files below it), a file, or a glob pattern."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = [
            p
            for p in sorted(path.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        return path.resolve(), [p.resolve() for p in files]
    if path.is_file():
        return path.parent.resolve(), [path.resolve()]
    matches = sorted(Path(m).resolve() for m in glob.glob(os.path.expanduser(spec), recursive=True))
    if matches:
        root = Path(os.path.commonpath([str(m.parent) for m in matches]))
        return root, [m for m in matches if m.is_file()]
    raise FileNotFoundError(f"dataset_dir not found: {spec!r} is no folder, file or matching glob")


def stdlib_dir() -> Path:
    """The embedded default corpus: the Python standard library's source folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def open_corpus(dataset_id: str, dataset_dir: str, seq_len: int, mode: ModelMode) -> Corpus:
    """Resolve a built-in corpus' files for ``mode``; errors name the dataset and folder."""
    if dataset_id == "pg19":
        root = Path(dataset_dir).expanduser()
        folder = root / PG19_FOLDERS[mode]
        if not folder.is_dir():
            raise FileNotFoundError(
                f"dataset 'pg19': {folder} is missing (expected train/, validation/, test/)"
            )
        files = tuple(sorted(p.resolve() for p in folder.glob("*.txt")))
        corpus = Corpus(root.resolve(), files, seq_len, mode, hash_split=False)
    elif dataset_id in ("bytes", "stdlib"):
        if dataset_id == "stdlib":
            root = stdlib_dir()
            files = tuple(sorted(p.resolve() for p in root.glob("*.py")))
        else:
            root, found = _list_files(dataset_dir)
            files = tuple(found)
        corpus = Corpus(root, files, seq_len, mode, hash_split=True)
    else:
        raise ValueError(f"unknown built-in corpus {dataset_id!r}")
    if not corpus.files:
        raise ValueError(f"dataset {dataset_id!r}: no files in {dataset_dir!r}")
    if corpus.num_windows == 0:
        largest = max(p.stat().st_size for p in corpus.files)
        raise ValueError(
            f"dataset {dataset_id!r} ({dataset_dir!r}) has no {mode.value} window of "
            f"input_seq_len={seq_len} bytes (largest file: {largest} bytes)"
        )
    return corpus
