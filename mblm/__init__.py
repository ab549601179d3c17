"""Multiscale Byte Language Model.

``import mblm`` needs only torch (and pydantic): Ray and MLflow are imported by the
training, tuning and tracking modules when they are used.
"""

from mblm.model.block import StageBlock
from mblm.model.config import MBLMModelConfig, MBLMReturnType, block_registry
from mblm.model.mamba import MambaBlock
from mblm.model.mamba1 import Mamba1Block
from mblm.model.mblm import MBLM
from mblm.model.transformer import TransformerBlock

__version__ = "0.5.0.dev0"

__all__ = [
    "MBLM",
    "Mamba1Block",
    "MambaBlock",
    "MBLMModelConfig",
    "MBLMReturnType",
    "StageBlock",
    "TransformerBlock",
    "block_registry",
]
