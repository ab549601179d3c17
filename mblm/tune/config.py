"""The sweep YAML: a base training config, a search space over it, and how to search.

```yaml
name: debug-sweep
base: ../debug.yaml                 # a training config, relative to this file
set: [train.target_elements=16384]  # overrides of the base, as `mblm train --set`
search: {algorithm: grid, num_samples: 1, seed: 0, metric: valid_bpb, mode: min}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
resources: {max_concurrent_trials: 1, workers_per_trial: 1, cpus_per_worker: 1}
limits: {max_params: 2000000, max_memory_gb: 4}
blocks:                              # names usable in params.block
  transformer: {block_type: transformer, attn_head_dims: 8, attn_num_heads: 2, ...}
space:                               # "section.field" of the training config -> values
  params.seq_lens: {factorizations: {stages: [2, 3], min_patch: 4}}
  params.hidden_dims: {per_stage: [32, 64]}
  params.block: {per_stage: [transformer, mamba2]}
  train.learning_rate: {loguniform: [0.0003, 0.01]}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mblm.train.config import TrainEntryConfig, format_validation_error

SWEEPABLE_SECTIONS = ("params", "train")


class Factorizations(BaseModel):
    """Every ordered way to write ``of`` as a product of ``stages`` patch sizes."""

    model_config = ConfigDict(extra="forbid")

    of: int | None = Field(default=None, gt=1, description="Default: params.input_seq_len")
    stages: list[int] = Field(min_length=1, description="Numbers of stages to factorize into")
    min_patch: int = Field(default=2, ge=1, description="Smallest patch size of a stage")
    max_patch: int | None = Field(default=None, ge=1, description="Largest patch size")


class ValueSpec(BaseModel):
    """One search dimension: exactly one of the fields."""

    model_config = ConfigDict(extra="forbid")

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    per_stage: list[Any] | None = Field(
        default=None, description="Each stage picks one of these (lists over stages)"
    )
    factorizations: Factorizations | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        return {"choice": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _exactly_one(self) -> ValueSpec:
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of choice (or a list), uniform, loguniform, per_stage, "
                f"factorizations; got {given or 'none'}"
            )
        for key in ("choice", "per_stage"):
            if getattr(self, key) == []:
                raise ValueError(f"{key} must not be empty")
        for key in ("uniform", "loguniform"):
            bounds = getattr(self, key)
            if bounds is not None and not (bounds[0] < bounds[1]):
                raise ValueError(f"{key} needs [low, high] with low < high, got {list(bounds)}")
            if key == "loguniform" and bounds is not None and bounds[0] <= 0:
                raise ValueError(f"loguniform needs low > 0, got {bounds[0]}")
        return self

    @property
    def continuous(self) -> bool:
        return self.uniform is not None or self.loguniform is not None


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algorithm: Literal["grid", "random", "optuna"] = "random"
    num_samples: int | None = Field(
        default=None, gt=0, description="random/optuna: trials (default 8); grid: repeats (1)"
    )
    seed: int = 0
    metric: str = Field(default="valid_bpb", description="Reported metric to optimise")
    mode: Literal["min", "max"] = "min"

    @property
    def trials(self) -> int:
        """random/optuna: how many trials; grid: how many times the grid runs."""
        return self.num_samples or (1 if self.algorithm == "grid" else 8)


class SchedulerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["asha", "none"] = "asha"
    grace_period: int = Field(
        default=1, gt=0, description="Validations a trial runs before it can be stopped"
    )
    reduction_factor: float = Field(default=2.0, gt=1)


class ResourcesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_concurrent_trials: int = Field(default=1, gt=0)
    workers_per_trial: int = Field(default=1, gt=0, description="Ray Train workers per trial")
    cpus_per_worker: float = Field(default=1.0, gt=0)
    use_gpu: bool = False
    gpus_per_worker: float | None = Field(default=None, gt=0)


class LimitsConfig(BaseModel):
    """Architectures over a limit are never launched."""

    model_config = ConfigDict(extra="forbid")

    max_params: int | None = Field(default=None, gt=0, description="Model parameters")
    max_memory_gb: float | None = Field(
        default=None, gt=0, description="Estimated training memory per worker (GiB)"
    )


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="Training config, relative to the sweep file")
    set: list[str] = Field(default=[], description="Overrides of the base config")
    output_dir: str | None = Field(
        default=None, description="Default: <base io.output_dir>/sweeps/<name>"
    )
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    blocks: dict[str, dict[str, Any]] = Field(default={}, description="Named stage blocks")
    space: dict[str, ValueSpec] = Field(min_length=1)

    # set by load_sweep_config
    source: str = Field(default="<sweep>", exclude=True)
    base_path: Path | None = Field(default=None, exclude=True)


def check_space_paths(sweep: SweepConfig) -> None:
    """Every path is ``section.field`` of a sweepable section of the training config."""
    sections = {
        "params": TrainEntryConfig.model_fields["params"].annotation,
        "train": TrainEntryConfig.model_fields["train"].annotation,
    }
    for path, spec in sweep.space.items():
        section, _, field = path.partition(".")
        klass = sections.get(section)
        if klass is None or not field or "." in field:
            raise ValueError(
                f"{sweep.source}: space.{path}: unknown parameter path; use section.field "
                f"with a section of {list(SWEEPABLE_SECTIONS)}, e.g. params.seq_lens"
            )
        if field not in klass.model_fields:  # type: ignore[union-attr]
            known = ", ".join(sorted(klass.model_fields))  # type: ignore[union-attr]
            raise ValueError(
                f"{sweep.source}: space.{path}: unknown parameter path ({section} has {known})"
            )
        if spec.factorizations is not None and path != "params.seq_lens":
            raise ValueError(f"{sweep.source}: space.{path}: factorizations is for params.seq_lens")
        if spec.continuous and sweep.search.algorithm == "grid":
            raise ValueError(
                f"{sweep.source}: space.{path}: grid search needs a list of choices, not a "
                "distribution (use search.algorithm: random or optuna)"
            )


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep YAML; the base config must exist. Errors are one line each."""
    from mblm.train.config import apply_overrides, read_yaml_mapping

    path = Path(path)
    data = read_yaml_mapping(path, "sweep file")
    # --set io./train./params./ray./mlflow. ... goes to the base training config (like
    # `mblm train --set`); anything else to the sweep itself
    training = tuple(f"{name}." for name in TrainEntryConfig.model_fields)
    to_base = [o for o in overrides or [] if o.strip().startswith(training)]
    # space.<section>.<field>=VALUES: the key of a space entry holds a dot itself
    to_space = [o for o in overrides or [] if o.strip().startswith("space.")]
    for item in to_space:
        key, _, raw = item.strip().partition("=")
        data.setdefault("space", {})[key.removeprefix("space.")] = yaml.safe_load(raw)
    rest = [o for o in overrides or [] if o not in to_base and o not in to_space]
    data = apply_overrides(data, rest)
    if to_base:
        data["set"] = [*(data.get("set") or []), *to_base]
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as err:
        raise ValueError(format_validation_error(err, str(path))) from None
    sweep.source = str(path)
    base = (path.parent / sweep.base).resolve()
    if not base.is_file():
        raise FileNotFoundError(f"{path}: base: training config not found: {base}")
    sweep.base_path = base
    check_space_paths(sweep)
    return sweep
