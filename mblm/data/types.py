"""Batch types and model modes shared by datasets and the trainer (seed API)."""

from __future__ import annotations

from enum import Enum
from typing import TypeAlias

import torch


class ModelMode(Enum):
    TRAIN = "train"
    VALID = "valid"
    TEST = "test"


#: ``(inputs, loss_mask)``, both ``(B, L)``: byte ids and per-byte loss weights
BatchWithLossMask: TypeAlias = tuple[torch.Tensor, torch.Tensor]
