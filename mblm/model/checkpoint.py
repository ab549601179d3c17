"""Model files: save/load our format, and convert checkpoints of the reference package.

Our model file is a ``torch.save`` of plain data (loadable with ``weights_only=True``)::

    {"format": "mblm-model", "version": 1, "config": {...MBLMModelConfig...},
     "state_dict": {...}}

The reference (PyPI ``mblm`` 0.4.2) writes ``{"MODEL": state_dict, "LOSS": float}`` next to
a ``config.yaml`` whose ``params`` section is the model config plus ``input_seq_len``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from mblm.model.config import MBLMModelConfig
from mblm.model.mblm import MBLM

FORMAT = "mblm-model"
VERSION = 1


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_model(model: MBLM, path: str | Path) -> Path:
    """Write ``model`` (config and weights) atomically to ``path``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return atomic_torch_save(
        {
            "format": FORMAT,
            "version": VERSION,
            "config": model.cfg.model_dump(mode="json"),
            "state_dict": state,
        },
        path,
    )


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> MBLM:
    """Load a model file written by :func:`save_model` (weights only, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        hint = " (a reference checkpoint? use `mblm convert-reference`)" if "MODEL" in blob else ""
        raise ValueError(f"{path} is not an mblm model file{hint}")
    return build_model(blob["config"], blob["state_dict"]).to(map_location)


def build_model(config: Mapping[str, Any], state: Mapping[str, torch.Tensor]) -> MBLM:
    """An MBLM from a config dict and its weights."""
    model = MBLM(MBLMModelConfig.model_validate(config))
    model.load_state_dict(state)
    return model


def _strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def reference_model_config(config: Mapping[str, Any] | str | Path) -> MBLMModelConfig:
    """The model config from a reference ``config.yaml`` (its ``params``) or a model config."""
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise FileNotFoundError(f"reference config not found: {path}")
        config = yaml.safe_load(path.read_text())
        if not isinstance(config, Mapping):
            raise ValueError(f"{path}: expected a YAML mapping, got {type(config).__name__}")
    data = dict(config.get("params", config))
    fields = set(MBLMModelConfig.model_fields)
    return MBLMModelConfig.model_validate({k: v for k, v in data.items() if k in fields})


def convert_reference_state_dict(
    state: Mapping[str, torch.Tensor], cfg: MBLMModelConfig
) -> dict[str, torch.Tensor]:
    """Map a reference MBLM state dict (mblm 0.4.2 layout) to ours for the same config."""
    state = _strip_prefixes(state)
    n = cfg.num_stages
    out: dict[str, torch.Tensor] = {}
    stage_parts: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    emb_names = {"_post.1": "norm_in", "_post.2": "proj", "_post.3": "norm_out"}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("start_tokens", "pos_embs", "to_logits"):
            out[key] = value
        elif parts[0] == "stage_models":
            stage_parts[int(parts[1])][".".join(parts[2:])] = value
        elif parts[0] == "to_next_stage_proj" and parts[2] == "1":
            out[f"to_next_stage.{parts[1]}.{parts[3]}"] = value
        elif parts[0] == "token_embs_rev":
            stage = n - 1 - int(parts[1])
            rest = ".".join(parts[2:])
            if rest == "embedding.weight":
                out[f"token_embs.{stage}{'' if stage == n - 1 else '.bytes'}.weight"] = value
            elif ".".join(parts[2:4]) in emb_names:
                out[f"token_embs.{stage}.{emb_names['.'.join(parts[2:4])]}.{parts[4]}"] = value
            else:
                raise ValueError(f"unexpected key in a reference checkpoint: {key!r}")
        else:
            raise ValueError(f"unexpected key in a reference checkpoint: {key!r}")
    for k, blk in enumerate(cfg.stage_blocks()):
        for key, value in type(blk).convert_reference_state(stage_parts[k]).items():
            out[f"stages.{k}.{key}"] = value
    return out


def convert_reference_checkpoint(
    checkpoint: str | Path | Mapping[str, Any], config: Mapping[str, Any] | str | Path
) -> MBLM:
    """Build our model from a reference checkpoint (``{"MODEL": state_dict}``) and config."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"reference checkpoint not found: {path}")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise ValueError("a reference checkpoint must be a mapping")
    state = checkpoint.get("MODEL", checkpoint)
    cfg = reference_model_config(config)
    model = MBLM(cfg)
    converted = convert_reference_state_dict(state, cfg)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(
            "reference checkpoint does not fit its config: "
            f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}"
        )
    return model


def parameter_count(cfg: MBLMModelConfig) -> int:
    """Parameters of the model ``cfg`` describes, counted on the meta device (no memory)."""
    with torch.device("meta"):
        model = MBLM(cfg)
    return sum(p.numel() for p in model.parameters())
