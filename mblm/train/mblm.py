"""The seed's training module: configs, the dataset registry and ``train_mblm``."""

from mblm.data.registry import dataset_registry
from mblm.train.config import (
    MlflowConfig,
    RayConfig,
    TrainEntryConfig,
    TrainMBLMIoConfig,
    TrainMBLMParams,
    load_train_config,
)
from mblm.train.run import TrainResult, train_mblm

__all__ = [
    "MlflowConfig",
    "RayConfig",
    "TrainEntryConfig",
    "TrainMBLMIoConfig",
    "TrainMBLMParams",
    "TrainResult",
    "dataset_registry",
    "load_train_config",
    "train_mblm",
]
