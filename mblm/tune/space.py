"""The search space: architectures enumerated or sampled, checked before any trial starts.

An architecture is the discrete part of a trial (stages, patch sizes, widths, depths,
blocks); continuous dimensions (a learning rate) never make a config invalid. Every
candidate is validated as a full training config and sized on the ``meta`` device, so
combinations that cannot run (patch product below the input length, stage lists of
different lengths, a Mamba head size that does not divide the width, over the parameter or
memory budget) are counted and skipped, never launched.
"""

from __future__ import annotations

import copy
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from mblm.model.checkpoint import parameter_count
from mblm.train.config import TrainEntryConfig, apply_overrides
from mblm.tune.config import Factorizations, SweepConfig, ValueSpec

ENUMERATE_LIMIT = 5000  # grid/optuna enumerate at most this many architectures
RANDOM_DRAWS = 2000  # random search gives up after this many invalid draws


@dataclass
class Candidate:
    """A valid trial configuration."""

    overrides: dict[str, Any]  # "section.field" -> value
    config: dict[str, Any]  # the full training config (JSON-able)
    num_params: int
    memory_gb: float
    summary: str = field(default="")


@dataclass
class SpaceReport:
    candidates: list[Candidate]
    skipped: int  # invalid combinations never launched
    reasons: dict[str, int]  # why, with counts


def load_base(sweep: SweepConfig) -> dict[str, Any]:
    """The base training config as a dict, with the sweep's ``set`` applied; validated."""
    assert sweep.base_path is not None
    data = yaml.safe_load(sweep.base_path.read_text())
    data = apply_overrides(data, list(sweep.set))
    try:
        TrainEntryConfig.model_validate(data)
    except ValidationError as err:
        from mblm.train.config import format_validation_error

        raise ValueError(format_validation_error(err, str(sweep.base_path))) from None
    return dict(data)


def factorizations(spec: Factorizations, of: int) -> list[list[int]]:
    """Ordered factorizations of ``of`` into ``stages`` factors within the patch bounds."""
    n = spec.of or of
    hi = spec.max_patch or n

    def split(rest: int, parts: int) -> Iterator[list[int]]:
        if parts == 1:
            if spec.min_patch <= rest <= hi:
                yield [rest]
            return
        for d in range(spec.min_patch, min(rest, hi) + 1):
            if rest % d == 0:
                for tail in split(rest // d, parts - 1):
                    yield [d, *tail]

    return [f for stages in spec.stages for f in split(n, stages)]


def _stage_options(path: str, spec: ValueSpec, stages: int, sweep: SweepConfig) -> list[Any]:
    """The discrete values of one dimension for a model with ``stages`` stages."""
    if spec.per_stage is not None:
        values = [_block(v, sweep) if path == "params.block" else v for v in spec.per_stage]
        return [list(p) for p in itertools.product(values, repeat=stages)]
    assert spec.choice is not None
    if path == "params.block":
        return [
            [_block(b, sweep) for b in v] if isinstance(v, list) else _block(v, sweep)
            for v in spec.choice
        ]
    return list(spec.choice)


def _block(value: Any, sweep: SweepConfig) -> Any:
    """A block name from the sweep's ``blocks`` section, or a block mapping as given."""
    if isinstance(value, str):
        if value not in sweep.blocks:
            known = ", ".join(sorted(sweep.blocks)) or "none"
            raise ValueError(
                f"{sweep.source}: space.params.block: block {value!r} is not defined in the "
                f"sweep's blocks section (defined: {known})"
            )
        return copy.deepcopy(sweep.blocks[value])
    return value


def _discrete(sweep: SweepConfig) -> dict[str, ValueSpec]:
    return {p: s for p, s in sweep.space.items() if not s.continuous}


def _seq_lens_options(sweep: SweepConfig, base: dict[str, Any]) -> list[Any]:
    spec = sweep.space.get("params.seq_lens")
    if spec is None:
        return [base["params"]["seq_lens"]]
    if spec.factorizations is not None:
        return factorizations(spec.factorizations, int(base["params"]["input_seq_len"]))
    return _stage_options("params.seq_lens", spec, len(base["params"]["seq_lens"]), sweep)


def count_architectures(sweep: SweepConfig, base: dict[str, Any]) -> int:
    total = 0
    for seq_lens in _seq_lens_options(sweep, base):
        stages = len(seq_lens) if isinstance(seq_lens, list) else 1
        sizes = [
            len(_stage_options(p, s, stages, sweep))
            for p, s in _discrete(sweep).items()
            if p != "params.seq_lens"
        ]
        total += math.prod(sizes)
    return total


def enumerate_architectures(sweep: SweepConfig, base: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every combination of the discrete dimensions, as overrides."""
    others = [p for p in _discrete(sweep) if p != "params.seq_lens"]
    for seq_lens in _seq_lens_options(sweep, base):
        stages = len(seq_lens) if isinstance(seq_lens, list) else 1
        options = [_stage_options(p, sweep.space[p], stages, sweep) for p in others]
        for combo in itertools.product(*options):
            arch = dict(zip(others, combo, strict=True))
            if "params.seq_lens" in sweep.space:
                arch["params.seq_lens"] = seq_lens
            yield copy.deepcopy(arch)


def sample_architecture(
    sweep: SweepConfig, base: dict[str, Any], rng: random.Random
) -> dict[str, Any]:
    seq_lens = rng.choice(_seq_lens_options(sweep, base))
    stages = len(seq_lens) if isinstance(seq_lens, list) else 1
    arch = {
        p: rng.choice(_stage_options(p, s, stages, sweep))
        for p, s in _discrete(sweep).items()
        if p != "params.seq_lens"
    }
    if "params.seq_lens" in sweep.space:
        arch["params.seq_lens"] = seq_lens
    return copy.deepcopy(arch)


def sample_continuous(sweep: SweepConfig, rng: random.Random) -> dict[str, float]:
    out = {}
    for path, spec in sweep.space.items():
        if spec.uniform is not None:
            out[path] = rng.uniform(*spec.uniform)
        elif spec.loguniform is not None:
            lo, hi = spec.loguniform
            out[path] = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return out


def apply(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for path, value in overrides.items():
        section, _, key = path.partition(".")
        data.setdefault(section, {})[key] = copy.deepcopy(value)
    return data


def estimate_memory_gb(cfg: TrainEntryConfig, num_params: int) -> float:
    """A rough upper estimate of one worker's training memory, fp32.

    Weights, gradients and AdamW's two moments (16 bytes per parameter), plus activations:
    about 64 bytes per position, width and layer, and the attention scores of Transformer
    stages, for every position of every stage (start tokens included), times the batch.
    """
    p = cfg.params
    blocks = p.stage_blocks()
    acts = 0.0
    outer = 1
    for k, (length, dim, layers) in enumerate(
        zip(p.seq_lens, p.hidden_dims, p.num_layers, strict=True)
    ):
        positions = outer * (1 + length)
        acts += positions * dim * layers * 64
        heads = getattr(blocks[k], "attn_num_heads", 0)
        acts += outer * heads * (1 + length) ** 2 * layers * 4
        outer *= length
    return (16 * num_params + cfg.train.batch_size * acts) / 2**30


def summarize(cfg: TrainEntryConfig) -> str:
    p = cfg.params
    blocks = "/".join(getattr(b, "block_type", type(b).__name__) for b in p.stage_blocks())
    return f"seq_lens={p.seq_lens} dims={p.hidden_dims} layers={p.num_layers} {blocks}"


def check(sweep: SweepConfig, base: dict[str, Any], overrides: dict[str, Any]) -> Candidate | str:
    """A valid candidate, or why not (one short reason)."""
    data = apply(base, overrides)
    try:
        cfg = TrainEntryConfig.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(x) for x in e["loc"])
        return f"{loc}: {e['msg'].removeprefix('Value error, ')}"
    except ValueError as err:
        return str(err)
    try:
        num_params = parameter_count(cfg.params.model_config_only())
    except (ValueError, RuntimeError) as err:
        return f"model cannot be built: {err}"
    memory = estimate_memory_gb(cfg, num_params)
    limits = sweep.limits
    if limits.max_params is not None and num_params > limits.max_params:
        return f"over limits.max_params={limits.max_params:,}"
    if limits.max_memory_gb is not None and memory > limits.max_memory_gb:
        return f"over limits.max_memory_gb={limits.max_memory_gb:g}"
    return Candidate(overrides, cfg.model_dump(mode="json"), num_params, memory, summarize(cfg))


def architectures(sweep: SweepConfig, base: dict[str, Any]) -> SpaceReport:
    """The valid architectures (grid and optuna: all of them; random: the sampled trials).

    Random search draws ``num_samples`` architectures (with their continuous values),
    drawing again for each invalid one; grid and optuna enumerate the discrete space.
    Raises ValueError when nothing valid remains, before any trial starts.
    """
    reasons: dict[str, int] = {}
    out: list[Candidate] = []
    skipped = 0

    def note(reason: str) -> None:
        nonlocal skipped
        skipped += 1
        key = reason.split(" (")[0][:120]
        reasons[key] = reasons.get(key, 0) + 1

    if sweep.search.algorithm == "random":
        rng = random.Random(sweep.search.seed)
        while len(out) < sweep.search.trials:
            if skipped >= RANDOM_DRAWS:
                break
            arch = sample_architecture(sweep, base, rng)
            got = check(sweep, base, {**arch, **sample_continuous(sweep, rng)})
            if isinstance(got, str):
                note(got)
            else:
                out.append(got)
    else:
        total = count_architectures(sweep, base)
        if total > ENUMERATE_LIMIT:
            raise ValueError(
                f"{sweep.source}: the space has {total:,} architectures, more than "
                f"{ENUMERATE_LIMIT:,} to enumerate for {sweep.search.algorithm} search; "
                "use search.algorithm: random"
            )
        seen: list[dict[str, Any]] = []
        for arch in enumerate_architectures(sweep, base):
            if arch in seen:
                continue
            seen.append(arch)
            got = check(sweep, base, arch)
            if isinstance(got, str):
                note(got)
            else:
                out.append(got)
    if not out:
        why = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda t: -t[1]))
        raise ValueError(
            f"{sweep.source}: the search space has no valid architecture "
            f"({skipped} combinations tried, all invalid: {why})"
        )
    return SpaceReport(out, skipped, reasons)
