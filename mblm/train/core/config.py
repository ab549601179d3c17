"""Core training configuration (the seed's ``mblm.train.core.config``), typed and strict."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CoreModelParams(BaseModel):
    """Model parameters every trainer needs."""

    model_config = ConfigDict(extra="forbid")

    input_seq_len: int = Field(gt=0, description="Bytes per training window (the context)")


class CoreTrainConfig(BaseModel):
    """How long and how to train."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(gt=0, description="Sequences per batch on each worker")
    target_elements: int = Field(
        gt=0, description="Training budget, a lower bound: batches or bytes (see strategy)"
    )
    target_elements_strategy: Literal["batch", "sequence"] = Field(
        description="'batch': target_elements counts sequences; 'sequence': counts bytes"
    )
    learning_rate: float = Field(gt=0, description="Peak learning rate of AdamW")
    warmup_steps_perc: float = Field(
        default=0.1, ge=0, le=1, description="Share of optimizer steps spent warming up"
    )
    gradient_accumulate_every: int = Field(gt=0, description="Micro-batches per optimizer step")
    gradient_clipping: float | None = Field(
        default=None, gt=0, description="Max global gradient norm (None: no clipping)"
    )
    shuffle_train: bool = Field(default=False, description="Shuffle training windows (seeded)")
    shuffle_eval: bool = Field(default=False, description="Shuffle validation windows (seeded)")
    max_eval_steps: int | None = Field(
        default=None, gt=0, description="Cap on validation batches per evaluation"
    )


class CoreIoConfig(BaseModel):
    """Where outputs go and how often to log, validate and keep models."""

    model_config = ConfigDict(extra="forbid")

    name_model: str = Field(min_length=1, description="Model name, used for runs and files")
    output_dir: str = Field(min_length=1, description="Folder for all outputs of the run")
    num_models_to_save: int = Field(gt=0, description="Best checkpoints (by valid loss) kept")
    validate_amount: int = Field(gt=0, description="Number of validations over the run")
    log_train_loss_amount: int = Field(gt=0, description="Number of training-loss log points")
    enabled_loss_log_for_gpus: list[int] = Field(
        default=[0], description="Kept for reference configs; only rank 0 logs"
    )

    @model_validator(mode="after")
    def _check(self) -> CoreIoConfig:
        if self.num_models_to_save > self.validate_amount:
            raise ValueError(
                f"num_models_to_save={self.num_models_to_save} exceeds "
                f"validate_amount={self.validate_amount}: a model is kept per validation"
            )
        return self
