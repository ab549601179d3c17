"""Stage blocks: the typed config of the model that runs at one MBLM stage.

A stage block is a pydantic model that knows how to build a ``torch.nn.Module``
for a stage. The module it builds must map ``(N, S, D) -> (N, S, D)`` causally:
output position ``s`` may only depend on input positions ``<= s``.

Contract for a block class (checked by the test suite for every registered block):

- subclass :class:`StageBlock`, give ``block_type`` a default (its registry name),
- implement ``to_model(model_dim, num_layers)``,
- optionally override ``check_stage(model_dim, seq_len)`` to reject sizes the block
  cannot run with (raise ``ValueError`` naming the field and value),
- optionally give the module ``prefill(x, max_len) -> (out, state)`` and
  ``step(x_t, state) -> (out_t, state)`` for cached generation (the contract is in
  :mod:`mblm.model.decode`); without them, generation keeps the stage's inputs and reruns
  the module on them for every step, which is correct for any causal module, only slower.

Blocks are registered in :data:`mblm.model.config.block_registry` so that YAML and dict
configs can name them. Parsing is deterministic: an explicit ``block_type`` selects the
class; without it, exactly one registered class must accept the fields.
"""

from __future__ import annotations

import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class StageBlock(ABC, BaseModel):
    """Configuration for the model block at one MBLM stage."""

    model_config = ConfigDict(extra="forbid")

    block_type: str = Field(description="Registry name of the block, e.g. 'transformer'")
    pos_emb_type: Literal["fixed", "rope"] | None = Field(
        default=None,
        description="Positional embedding added to the stage's tokens: fixed, rope or none",
    )

    @abstractmethod
    def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
        """Build the stage module for width ``model_dim`` and depth ``num_layers``."""

    def check_stage(self, model_dim: int, seq_len: int) -> None:
        """Raise ``ValueError`` if this block cannot run at the given stage size."""
        if self.pos_emb_type == "rope" and model_dim % 2:
            raise ValueError(f"pos_emb_type='rope' needs an even hidden dim, got {model_dim}")

    @classmethod
    def convert_reference_state(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a reference (mblm 0.4.2) stage module's state dict to this block's module.

        Keys are relative to the stage module. The default keeps them unchanged.
        """
        return dict(state)

    @classmethod
    def type_names(cls) -> tuple[str, ...]:
        """The ``block_type`` values this class answers to (its default first)."""
        field = cls.model_fields["block_type"]
        names: list[str] = []
        if isinstance(field.default, str):
            names.append(field.default)
        if typing.get_origin(field.annotation) is Literal:
            names += [a for a in typing.get_args(field.annotation) if a not in names]
        return tuple(names)


TStageBlock = TypeVar("TStageBlock", bound=StageBlock)


def _first_error(err: Exception) -> str:
    if isinstance(err, ValidationError):
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"]) or "block"
        return f"{loc}: {e['msg']}"
    return str(err)


class StageBlockRegistry:
    """Name -> block class. Use ``@block_registry.register()`` on a StageBlock subclass."""

    def __init__(self) -> None:
        self._blocks: dict[str, type[StageBlock]] = {}

    def register(self) -> Callable[[type[TStageBlock]], type[TStageBlock]]:
        def decorator(klass: type[TStageBlock]) -> type[TStageBlock]:
            if not (isinstance(klass, type) and issubclass(klass, StageBlock)):
                raise TypeError(f"{klass!r} is not a StageBlock subclass")
            names = klass.type_names()
            if not names:
                raise ValueError(f"{klass.__name__}.block_type needs a default (its registry name)")
            for name in names:
                old = self._blocks.get(name)
                same = old is not None and old.__qualname__ == klass.__qualname__
                if old is not None and not same:
                    raise ValueError(
                        f"block_type {name!r} is already registered by {old.__qualname__}"
                    )
                self._blocks[name] = klass
            return klass

        return decorator

    def __iter__(self) -> Iterator[type[StageBlock]]:
        return iter(dict.fromkeys(self._blocks.values()))

    def __contains__(self, item: object) -> bool:
        return item in self._blocks.values() or item in self._blocks

    def names(self) -> list[str]:
        return sorted(self._blocks)

    def get(self, name: str) -> type[StageBlock]:
        try:
            return self._blocks[name]
        except KeyError:
            raise ValueError(
                f"unknown block_type {name!r}; registered: {', '.join(self.names())}"
            ) from None

    def parse(self, data: Any) -> StageBlock:
        """Parse a block from a mapping (or pass a StageBlock through)."""
        if isinstance(data, StageBlock):
            return data
        if not isinstance(data, Mapping):
            raise ValueError(f"a block must be a mapping of fields, got {data!r}")
        if data.get("block_type") is not None:
            return self.get(str(data["block_type"])).model_validate(dict(data))
        matches: list[StageBlock] = []
        reasons: list[str] = []
        for klass in self:
            try:
                matches.append(klass.model_validate(dict(data)))
            except (ValidationError, ValueError) as err:
                reasons.append(f"{klass.__name__} ({_first_error(err)})")
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise ValueError(
                f"fields {sorted(data)} match no registered block: " + "; ".join(reasons)
            )
        names = ", ".join(f"{type(m).__name__} ({m.block_type!r})" for m in matches)
        raise ValueError(
            f"fields {sorted(data)} match several blocks: {names}; set block_type to choose"
        )
