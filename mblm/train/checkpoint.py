"""Training state in a checkpoint folder: model, optimizer, scheduler, RNG states and step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mblm.model.checkpoint import atomic_torch_save, build_model
from mblm.model.mblm import MBLM

STATE_FILE = "state.pt"


def save_training_state(
    folder: Path, model: MBLM, opt: torch.optim.Optimizer, sched: Any, step: int
) -> Path:
    """Write ``state.pt`` atomically; loadable with ``torch.load(weights_only=True)``."""
    # data order comes from seeds and the step; the torch RNG drives dropout
    rng = {"torch": torch.get_rng_state()}
    return atomic_torch_save(
        {
            "step": step,
            "model_config": model.cfg.model_dump(mode="json"),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": rng,
        },
        folder / STATE_FILE,
    )


def load_training_state(folder: Path, model: MBLM, opt: torch.optim.Optimizer, sched: Any) -> int:
    """Restore everything :func:`save_training_state` wrote; returns the step to continue at."""
    blob = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(blob["model"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    torch.set_rng_state(blob["rng"]["torch"])
    return int(blob["step"])


def model_from_training_state(folder: Path) -> MBLM:
    blob = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    return build_model(blob["model_config"], blob["model"])
