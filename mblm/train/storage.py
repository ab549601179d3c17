"""The run's folder in Ray Train's storage: where it is, whether it holds a run to resume.

Ray Train keeps a run's checkpoints under ``<storage_path>/<name>/`` and restores from them
when a trainer with the same name and storage path starts again. Next to them we keep
``mblm_run.json``: the MLflow run that tracks the run (so a resumed run goes on logging
into it) and the settings that must not change between the two (model, training budget,
world size). Storage can be a local folder or a URI Ray understands (``s3://``, ``gs://``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mblm.train.config import TrainEntryConfig

RUN_RECORD = "mblm_run.json"
SNAPSHOT = "checkpoint_manager_snapshot.json"  # written by Ray Train at every checkpoint


def storage_root(cfg: TrainEntryConfig) -> str:
    """Absolute local path or a URI (kept as given)."""
    path = cfg.ray.storage_path
    if path and "://" in path:
        return path.rstrip("/")
    return str(Path(path or Path(cfg.io.output_dir) / "ray").expanduser().resolve())


def _fs(uri_or_path: str) -> tuple[Any, str]:
    import pyarrow.fs

    if "://" in uri_or_path:
        return pyarrow.fs.FileSystem.from_uri(uri_or_path)
    return pyarrow.fs.LocalFileSystem(), uri_or_path


def _exists(fs: Any, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def resume_settings(cfg: TrainEntryConfig) -> dict[str, Any]:
    """What must be equal for a checkpoint of one run to continue in another."""
    return {
        "params": cfg.params.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json"),
        "num_workers": cfg.ray.num_workers,
        "dataset": [cfg.io.dataset_id, cfg.io.dataset_dir, cfg.io.dataset_args],
    }


class RunFolder:
    """``<storage>/<name>``: Ray Train's checkpoints plus our record of the run."""

    def __init__(self, cfg: TrainEntryConfig):
        self.root = storage_root(cfg)
        self.path = f"{self.root}/{cfg.io.name_model}"
        self.fs, self._fs_path = _fs(self.path)

    def has_checkpoint(self) -> bool:
        return _exists(self.fs, f"{self._fs_path}/{SNAPSHOT}")

    def read_record(self) -> dict[str, Any] | None:
        path = f"{self._fs_path}/{RUN_RECORD}"
        if not _exists(self.fs, path):
            return None
        with self.fs.open_input_stream(path) as f:
            return dict(json.loads(f.read().decode()))

    def write_record(self, record: dict[str, Any]) -> None:
        """Written to a temporary name and moved into place: never half-written."""
        self.fs.create_dir(self._fs_path, recursive=True)
        tmp, path = f"{self._fs_path}/.{RUN_RECORD}.tmp", f"{self._fs_path}/{RUN_RECORD}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, indent=1).encode())
        self.fs.move(tmp, path)

    def check_resumable(self, cfg: TrainEntryConfig) -> None:
        """A checkpointed run in this folder must have been trained with the same settings."""
        record = self.read_record()
        if record is None:
            return
        old, new = record.get("settings", {}), resume_settings(cfg)
        for section in new:
            diff = _first_difference(old.get(section), new[section], section)
            if diff:
                raise ValueError(
                    f"{self.path} holds a run of '{cfg.io.name_model}' trained with other "
                    f"settings ({diff}): it cannot resume with this config; set io.name_model "
                    f"or ray.storage_path to start a new run, or delete that folder"
                )


def _first_difference(old: Any, new: Any, path: str) -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            diff = _first_difference(old.get(key), new.get(key), f"{path}.{key}")
            if diff:
                return diff
        return None
    if old != new:
        name = {"num_workers": "ray.num_workers", "dataset": "io.dataset_*"}.get(path, path)
        return f"{name}: {old!r} then, {new!r} now"
    return None
