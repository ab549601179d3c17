"""The training entry config: the seed's sections (io, train, params) plus ray and mlflow.

Loads from YAML through pydantic, strictly: unknown keys are errors that name the key, and
``--set a.b=value`` overrides (parsed as YAML scalars) apply before validation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mblm.model.config import MBLMModelConfig
from mblm.train.core.config import CoreIoConfig, CoreModelParams, CoreTrainConfig


class TrainMBLMParams(MBLMModelConfig, CoreModelParams):
    """The model config plus the training window length."""

    @model_validator(mode="after")
    def _check_window(self) -> TrainMBLMParams:
        if self.input_seq_len > self.max_seq_len:
            raise ValueError(
                f"input_seq_len={self.input_seq_len} exceeds the model's context "
                f"prod(seq_lens)={self.max_seq_len} (seq_lens={self.seq_lens})"
            )
        return self

    def model_config_only(self) -> MBLMModelConfig:
        fields = set(MBLMModelConfig.model_fields)
        return MBLMModelConfig.model_validate(
            {k: v for k, v in self.model_dump().items() if k in fields}
        )


class TrainMBLMIoConfig(CoreIoConfig):
    """Inputs and outputs of a run."""

    dataset_dir: str = Field(description="Corpus folder, file or glob (see the dataset id)")
    dataset_id: str = Field(min_length=1, description="Dataset registry id, e.g. 'bytes'")
    dataset_args: dict[str, Any] | None = Field(
        default=None, description="Extra arguments for the dataset"
    )
    description: str | None = Field(default=None, description="Free text about the run")


class RayConfig(BaseModel):
    """How the run is spread over Ray workers."""

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(default=1, gt=0, description="Training workers (DDP ranks)")
    use_gpu: bool = Field(default=False, description="One GPU per worker")
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs reserved per worker (fractions allowed)"
    )
    gpus_per_worker: float | None = Field(
        default=None, gt=0, description="GPUs per worker when use_gpu (default 1)"
    )
    storage_path: str | None = Field(
        default=None, description="Run storage (checkpoints); default: <output_dir>/ray"
    )
    max_failures: int = Field(
        default=0, ge=-1, description="Worker failures to recover from (-1: unlimited)"
    )
    address: str | None = Field(
        default=None, description="Cluster to join (default: RAY_ADDRESS, else a local Ray)"
    )


class MlflowConfig(BaseModel):
    """Where runs are tracked."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(
        default=None,
        description="Tracking server or store (default: MLFLOW_TRACKING_URI, else a sqlite "
        "store under output_dir)",
    )
    experiment_name: str = Field(default="mblm", min_length=1, description="MLflow experiment")
    run_name: str | None = Field(default=None, description="Run name (default: name_model)")


class TrainEntryConfig(BaseModel):
    """Everything a training run needs."""

    model_config = ConfigDict(extra="forbid")

    io: TrainMBLMIoConfig
    train: CoreTrainConfig
    params: TrainMBLMParams
    ray: RayConfig = Field(default_factory=RayConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        parts = key.strip().split(".")
        node: Any = data
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``source: field.path: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        lines.append(f"{source}: {loc}: {e['msg']}{got}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping; one-line errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: malformed YAML: {err}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainEntryConfig:
    """Read, override and validate a training YAML; errors name the file and the field."""
    path = Path(path)
    data = apply_overrides(read_yaml_mapping(path, "config file"), overrides or [])
    try:
        return TrainEntryConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, str(path))) from None
