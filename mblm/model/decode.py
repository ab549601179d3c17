"""Generation for MBLM: cached incremental decoding, sampling, batched prompts.

Cached decoding follows the hierarchy. With n stages k = 0 (global) .. n-1 (local),
``Pk = seq_lens[k]`` positions per sequence of stage k and ``Rk = seq_lens[k+1] * ... *
seq_lens[n-1]`` bytes per position (a patch; 1 for the local stage):

- the local stage runs one step per byte;
- stage k < n-1 runs one step when a patch of Rk bytes is complete and the next byte starts a
  new patch within the same sequence of stage k; its output (projected by
  ``to_next_stage[k]``) conditions the new sequence of stage k+1, which starts from that
  stage's start token, and so on down to the local stage;
- only the current sequence of each stage is kept: a finished sequence never influences later
  ones except through the stages above it.

So a prompt is prefilled with one forward per stage, over the current sequence of that stage
only (at most 1 + Pk positions), not over the whole prompt; then each byte costs one local
step plus, every Rk bytes, one step of stage k.

A stage module takes part through two methods (the built-in Transformer, Mamba-2 and Mamba-1
stages have them)::

    prefill(x: (N, S, D), max_len: int) -> (out: (N, S, D), state)
    step(x: (N, 1, D), state) -> (out: (N, 1, D), state)

``state`` is a tensor or nested lists/tuples of tensors, each with the batch (row) first and a
shape that does not depend on S (``max_len`` is the most positions a stage sequence holds), so
rows can be gathered and scattered. Modules without them (custom blocks) are wrapped in
:class:`RecomputeStage`, which keeps the stage's inputs and reruns the module on them.

Rows of a batch may be at different positions (prompts of different lengths): every stage
state carries per-row positions, and a step runs only on the rows that need it.

Sampling (:class:`Sampler`) is shared by the cached and the uncached path
(:class:`RecomputeDecoder`, the whole model over the whole sequence for every byte), and draws
the same random numbers in both, so with the same generator their outputs are identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import nn

from mblm.model.config import MBLMReturnType
from mblm.utils.stream import ByteStreamer

if TYPE_CHECKING:
    from mblm.model.mblm import MBLM

#: a stage's decoding state: a tensor or nested lists/tuples of tensors, rows first
State = Any


@runtime_checkable
class IncrementalStage(Protocol):
    """What a stage module provides for cached decoding (see the module docstring)."""

    def prefill(self, x: torch.Tensor, max_len: int) -> tuple[torch.Tensor, State]: ...

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...


class RecomputeStage:
    """Cached decoding for a stage module without ``prefill``/``step``: keeps the inputs of
    the current sequence and reruns the module on them for every step (the module must be
    causal, as every stage module must)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def prefill(self, x: torch.Tensor, max_len: int) -> tuple[torch.Tensor, State]:
        n, s, d = x.shape
        history = x.new_zeros(n, max_len, d)  # (n, max_len, D)
        history[:, :s] = x
        pos = torch.full((n,), s, dtype=torch.long, device=x.device)
        return self.module(x), (history, pos)

    def step(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        history, pos = state
        rows = torch.arange(x.shape[0], device=x.device)
        history[rows, pos] = x[:, 0]
        # rows at earlier positions see padding after their own position: causal, no effect
        out = self.module(history[:, : int(pos.max()) + 1])  # (n, s, D)
        return out[rows, pos][:, None], (history, pos + 1)


def incremental(module: nn.Module) -> IncrementalStage:
    """The module itself if it has ``prefill`` and ``step``, else a :class:`RecomputeStage`."""
    if isinstance(module, IncrementalStage):
        return module
    return RecomputeStage(module)


def _tree_map(fn: Callable[..., torch.Tensor], *trees: State) -> State:
    first = trees[0]
    if isinstance(first, torch.Tensor):
        return fn(*trees)
    if isinstance(first, (list, tuple)):
        return type(first)(_tree_map(fn, *parts) for parts in zip(*trees, strict=True))
    raise TypeError(f"a stage state must hold tensors in lists/tuples, got {type(first)}")


class StageCache:
    """The decoding state of one stage for all rows of a batch.

    ``rows`` arguments are a long tensor of row indices, or None for all rows in order (no
    gathering or scattering then).
    """

    def __init__(self, stage: IncrementalStage, batch: int, max_len: int):
        self.stage = stage
        self.batch = batch
        self.max_len = max_len
        self.state: State = None

    def prefill(self, rows: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Start these rows' sequences from x (r, S, D); returns the outputs (r, S, D)."""
        out, state = self.stage.prefill(x, self.max_len)
        self._store(rows, state)
        return out

    def step(self, rows: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """Feed one position to these rows: x (r, 1, D) -> (r, 1, D)."""
        state = self.state
        if rows is not None:
            state = _tree_map(lambda t: t.index_select(0, rows), state)
        out, state = self.stage.step(x, state)
        self._store(rows, state)
        return out

    def _store(self, rows: torch.Tensor | None, state: State) -> None:
        if rows is None:
            self.state = state
            return
        if self.state is None:
            self.state = _tree_map(lambda t: t.new_zeros(self.batch, *t.shape[1:]), state)
        _tree_map(lambda full, part: full.index_copy_(0, rows, part), self.state, state)


def _set_rows(
    full: torch.Tensor | None, rows: torch.Tensor | None, part: torch.Tensor, batch: int
) -> torch.Tensor:
    """``full[rows] = part``, allocating ``full`` (batch, ...) on first use."""
    if rows is None:
        return part
    if full is None:
        full = part.new_zeros(batch, *part.shape[1:])
    return full.index_copy_(0, rows, part)


class _Decoder:
    """Shared bookkeeping: the ids so far (B, max_seq_len) and each row's length."""

    def __init__(self, model: MBLM, batch: int, device: torch.device):
        self.model = model
        self.batch = batch
        self.device = device
        self.ids = torch.full(
            (batch, model.max_seq_len), model.pad_token_id, dtype=torch.long, device=device
        )
        self.lengths = [0] * batch
        self.logits: torch.Tensor | None = None  # (B, V): each row's next-byte prediction

    def _index(self, rows: Sequence[int]) -> torch.Tensor | None:
        if len(rows) == self.batch and all(r == i for i, r in enumerate(rows)):
            return None
        return torch.tensor(list(rows), dtype=torch.long, device=self.device)

    def _set_logits(self, rows: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        self.logits = _set_rows(self.logits, rows, logits, self.batch)
        return self.logits

    def _append(self, tokens: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Write tokens[rows] after each row's ids; returns the positions written (r,)."""
        at = torch.tensor([self.lengths[r] for r in rows], dtype=torch.long, device=self.device)
        row_t = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        self.ids[row_t, at] = tokens[row_t]
        for r in rows:
            self.lengths[r] += 1
        return at

    def prefill(self, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Take the prompts (one 1-D tensor per row); returns the logits (B, V) of every
        row's next byte."""
        raise NotImplementedError

    def feed(self, tokens: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        """Append tokens[r] (tokens: (B,)) to each row r in ``rows``; returns the logits
        (B, V), updated for those rows (the others keep their last values)."""
        raise NotImplementedError


class RecomputeDecoder(_Decoder):
    """No cache: the whole model over each row's whole sequence for every byte."""

    def prefill(self, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        for r, prompt in enumerate(prompts):
            self.ids[r, : len(prompt)] = prompt
            self.lengths[r] = len(prompt)
        return self._predict(list(range(self.batch)))

    def feed(self, tokens: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        self._append(tokens, rows)
        return self._predict(rows)

    def _predict(self, rows: Sequence[int]) -> torch.Tensor:
        model = self.model
        row_t = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        lengths = torch.tensor([self.lengths[r] for r in rows], device=self.device)  # (r,)
        longest = max(self.lengths[r] for r in rows)
        logits: torch.Tensor | None = None
        if longest:
            # shorter rows are right-padded, which cannot change their outputs (causal)
            hidden = model(self.ids[row_t, :longest], MBLMReturnType.HIDDEN_STATE)  # (r, L, D)
            last = hidden[torch.arange(len(rows)), (lengths - 1).clamp(min=0)]  # (r, D)
            logits = model.to_logits(last)  # (r, V)
        if logits is None or (lengths == 0).any():
            first = model(self.ids[row_t, :0], MBLMReturnType.LOGITS)[:, 0]  # (r, V): byte 0
            logits = first if logits is None else torch.where((lengths > 0)[:, None], logits, first)
        return self._set_logits(self._index(rows), logits)


class CachedDecoder(_Decoder):
    """Incremental decoding with one :class:`StageCache` per stage."""

    def __init__(self, model: MBLM, batch: int, device: torch.device):
        super().__init__(model, batch, device)
        n, lens = model.num_stages, model.seq_lens
        self.n = n
        self.lens = lens
        self.spans = [math.prod(lens[k + 1 :]) for k in range(n)]  # Rk: bytes per position
        self.caches = [
            StageCache(incremental(model.stages[k]), batch, 1 + lens[k]) for k in range(n)
        ]
        # conds[k] (B, Pk, Dk): what stage k-1 adds to the positions of stage k's sequence
        self.conds: list[torch.Tensor | None] = [None] * n

    # ------------------------------------------------------------------------- helpers

    def _start(self, k: int, rows: int) -> torch.Tensor:
        return self.model.start_tokens[k].expand(rows, 1, -1)  # (r, 1, Dk)

    def _open(self, k: int, rows: torch.Tensor | None, out: torch.Tensor) -> None:
        """Start new sequences at stages k..n-1 for these rows (each from its start token),
        stage k conditioned on the output ``out`` (r, D(k-1)) of stage k-1, and each finer
        one on the start-token output of the stage above."""
        model = self.model
        for j in range(k, self.n):
            cond = model.to_next_stage[j - 1](out)  # (r, Pj * Dj)
            cond = cond.view(out.shape[0], self.lens[j], -1)  # (r, Pj, Dj)
            self.conds[j] = _set_rows(self.conds[j], rows, cond, self.batch)
            out = self.caches[j].prefill(rows, self._start(j, out.shape[0]))[:, -1]

    # ------------------------------------------------------------------------- prefill

    def prefill(self, prompts: Sequence[torch.Tensor]) -> torch.Tensor:
        by_length: dict[int, list[int]] = {}
        for r, prompt in enumerate(prompts):
            self.ids[r, : len(prompt)] = prompt
            self.lengths[r] = len(prompt)
            by_length.setdefault(len(prompt), []).append(r)
        for length, rows in by_length.items():
            row_t = torch.tensor(rows, dtype=torch.long, device=self.device)
            self._prefill_rows(self._index(rows), self.ids[row_t, :length])
        assert self.logits is not None
        return self.logits

    def _prefill_rows(self, rows: torch.Tensor | None, ids: torch.Tensor) -> None:
        """Prefill rows whose prompts ``ids`` (r, L) have the same length: at each stage,
        one forward over the start token and the positions of the current sequence that
        are complete (for the local stage: every byte of the current patch)."""
        model = self.model
        g, length = ids.shape
        last = length - 1  # the last byte fed; its stage sequences are the current ones
        cond: torch.Tensor | None = None
        out = ids.new_empty(0)
        for k in range(self.n):
            span = self.spans[k]
            seq_span = span * self.lens[k]  # bytes per sequence of stage k
            if length == 0:
                start, count = 0, 0
            else:
                start = last // seq_span * seq_span
                count = (last - start) // span + (1 if k == self.n - 1 else 0)
            x = self._start(k, g)  # (r, 1, Dk)
            if count:
                tokens = ids[:, start : start + count * span]
                if k < self.n - 1:
                    tokens = tokens.reshape(g, count, span)  # (r, count, Rk)
                positions = torch.arange(count, device=ids.device)
                emb = model._embed_stage(k, tokens, positions)  # (r, count, Dk)
                if cond is not None:
                    emb = emb + cond[:, :count]
                x = torch.cat((x.to(emb.dtype), emb), dim=1)  # (r, 1 + count, Dk)
            out = self.caches[k].prefill(rows, x)  # (r, 1 + count, Dk)
            if k < self.n - 1:
                cond = model.to_next_stage[k](out[:, -1]).view(g, self.lens[k + 1], -1)
                self.conds[k + 1] = _set_rows(self.conds[k + 1], rows, cond, self.batch)
        self._set_logits(rows, model.to_logits(out[:, -1]))

    # ------------------------------------------------------------------------- steps

    def _coarsest_boundary(self, t: int) -> int | None:
        """The coarsest stage k < n-1 where byte ``t`` starts a new patch inside the same
        sequence: the patch before it is complete, so stage k steps once. None: only the
        local stage steps (t = 0, or t inside a patch of stage n-2)."""
        if t == 0:
            return None
        for k in range(self.n - 1):
            if t % self.spans[k] == 0:
                return k
        return None

    def feed(self, tokens: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
        model = self.model
        at = self._append(tokens, rows)  # (r,) the positions of the new bytes
        # stages whose patch just completed: each row steps the coarsest such stage, whose
        # output then opens new sequences at every finer stage
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            k = self._coarsest_boundary(self.lengths[r] - 1)
            if k is not None:
                groups.setdefault(k, []).append(i)
        for k, members in sorted(groups.items()):
            self._step_stage(k, [rows[i] for i in members], at[members])

        # the local stage: one step on the new byte of every row
        row_t = torch.tensor(list(rows), dtype=torch.long, device=self.device)
        pos = at % self.lens[-1]  # (r,)
        x = model._embed_stage(self.n - 1, tokens[row_t][:, None], pos[:, None])  # (r, 1, Dn)
        if self.n > 1:
            x = x + self.conds[-1][row_t, pos][:, None]  # type: ignore[index]
        index = self._index(rows)
        out = self.caches[-1].step(index, x)  # (r, 1, Dn)
        return self._set_logits(index, model.to_logits(out[:, 0]))

    def _step_stage(self, k: int, rows: list[int], at: torch.Tensor) -> None:
        """Feed stage k the patch that ends before byte ``at`` (r,) of each row, then open
        new sequences at the finer stages."""
        model = self.model
        span = self.spans[k]
        row_t = torch.tensor(rows, dtype=torch.long, device=self.device)
        index = self._index(rows)
        cols = (at - span)[:, None] + torch.arange(span, device=self.device)  # (r, Rk)
        patch = self.ids[row_t[:, None], cols]  # (r, Rk)
        pos = (at // span) % self.lens[k] - 1  # (r,) the patch's position in its sequence
        x = model._embed_stage(k, patch[:, None], pos[:, None])  # (r, 1, Dk)
        cond = self.conds[k]
        if cond is not None:
            x = x + cond[row_t, pos][:, None]
        out = self.caches[k].step(index, x)  # (r, 1, Dk)
        self._open(k + 1, index, out[:, 0])


# ---------------------------------------------------------------------------------- sampling


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise shaped like ``like`` (float32, on its device): argmax(logits / T
    + noise) samples softmax(logits / T). Drawn on the generator's device (CPU for a seed)."""
    device = generator.device if generator is not None else like.device
    u = torch.rand(like.shape, generator=generator, device=device).to(like.device)
    neg_log_u = torch.log(u.clamp(min=1e-20)).neg()  # in (0, 46]
    return torch.log(neg_log_u.clamp(min=1e-20)).neg()


@dataclass
class Sampler:
    """Next-byte choice from logits: top-k, then temperature, then top-p (nucleus), then a
    Gumbel-max draw over the vocabulary.

    Every call draws noise for the whole (B, V) logits, whatever the filters keep, so two
    runs with the same generator draw the same numbers. With ``top_k=1`` (the seed's
    ``filter_thres=1.0``) the choice is the argmax: greedy.
    """

    temperature: float = 1.0
    top_k: int | None = 1
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (B, V) -> ids (B,)"""
        noise = gumbel_noise(logits, self.generator)  # (B, V)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            top, idx = logits.topk(self.top_k, dim=-1)  # (B, k)
            logits = torch.full_like(logits, -math.inf).scatter(-1, idx, top)
        logits = logits / self.temperature
        if self.top_p is not None and self.top_p < 1.0:
            probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)  # (B, V)
            before = probs.cumsum(dim=-1) - probs  # mass of the more likely bytes
            drop = (before >= self.top_p).scatter(-1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, -math.inf)
        return (logits + noise).argmax(dim=-1)


# ---------------------------------------------------------------------------------- the loop


def decode(
    model: MBLM,
    prompts: Sequence[torch.Tensor],
    budgets: Sequence[int],
    sampler: Sampler,
    *,
    use_cache: bool = True,
    streams: Sequence[ByteStreamer | None] | None = None,
    end_of_gen_token_id: int = -1,
    progress: bool = False,
) -> list[list[int]]:
    """Generate up to ``budgets[r]`` ids after ``prompts[r]`` (1-D, on the model's device);
    a row stops early after sampling ``end_of_gen_token_id``. Returns the new ids per row.

    The caller checks the inputs (ids in range, prompt + budget within the context).
    """
    batch = len(prompts)
    device = prompts[0].device if prompts else torch.device("cpu")
    decoder_cls = CachedDecoder if use_cache else RecomputeDecoder
    decoder = decoder_cls(model, batch, device)
    new: list[list[int]] = [[] for _ in range(batch)]
    active = [r for r in range(batch) if budgets[r] > 0]
    if not active:
        return new
    logits = decoder.prefill(prompts)
    steps: Iterable[int] = range(max(budgets))
    if progress:
        steps = _progress(steps)
    for _ in steps:
        tokens = sampler(logits)  # (B,)
        values = tokens.tolist()
        still = []
        for r in active:
            new[r].append(values[r])
            if streams is not None and streams[r] is not None:
                streams[r].write(values[r])  # type: ignore[union-attr]
            if values[r] != end_of_gen_token_id and len(new[r]) < budgets[r]:
                still.append(r)
        active = still
        if not active:
            break
        logits = decoder.feed(tokens, active)
    return new


def _progress(steps: Iterable[int]) -> Iterable[int]:
    try:
        from tqdm import tqdm
    except ImportError:
        return steps
    return tqdm(steps, leave=False)  # type: ignore[return-value]
