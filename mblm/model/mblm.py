"""The hierarchical model: stages from global (coarse patches) to local (bytes).

Notation in shape comments:
    B  batch size               L   flat input length (bytes)
    n  number of stages         Pk  sequence length at stage k (seq_lens[k])
    Dk hidden dim at stage k    V   vocabulary size
    Nk number of sequences stage k runs in parallel (B * P1' * ... * P(k-1))

Every stage prepends its learned start token, so stage k runs on 1 + Pk positions. The
output of stage k at positions 0..Pk-1 (everything except the last) is projected to
``P(k+1) * D(k+1)`` and added to the byte positions of the patches of stage k+1: patch j
of stage k+1 sees stage k's output *before* patch j, so no position sees its own future.
The local stage's output after byte i predicts byte i+1; byte 0 is predicted from the
local start token of the first patch alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint

from mblm.model.config import MBLMModelConfig, MBLMReturnType
from mblm.model.decode import Sampler, decode, gumbel_noise
from mblm.model.layers import InterleavedRoPE
from mblm.utils.stream import ByteStreamer

__all__ = ["MBLM", "PatchEmbedding", "gumbel_noise"]


class PatchEmbedding(nn.Module):
    """Embeds the bytes of each patch of a global stage: flatten, LayerNorm, Linear, LayerNorm."""

    def __init__(self, vocab: int, pad_id: int, byte_dim: int, patch_size: int, dim: int):
        super().__init__()
        self.bytes = nn.Embedding(vocab, byte_dim, padding_idx=pad_id)
        self.norm_in = nn.LayerNorm(patch_size * byte_dim)
        self.proj = nn.Linear(patch_size * byte_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = rearrange(self.bytes(ids), "... r d -> ... (r d)")  # (..., R * Dn)
        return self.norm_out(self.proj(self.norm_in(x)))  # (..., Dk)


class MBLM(nn.Module):
    """Multiscale Byte Language Model."""

    def __init__(self, cfg: MBLMModelConfig):
        super().__init__()
        if not isinstance(cfg, MBLMModelConfig):
            raise TypeError(f"MBLM needs an MBLMModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.num_stages = cfg.num_stages
        self.seq_lens = list(cfg.seq_lens)
        self.hidden_dims = list(cfg.hidden_dims)
        self.num_tokens = cfg.num_tokens
        self.pad_token_id = cfg.pad_token_id
        self.max_seq_len = cfg.max_seq_len
        chunks = cfg.train_checkpoint_chunks
        self.checkpoint_chunks: list[int | None] = (
            [None, *chunks] if chunks else [None] * len(self.seq_lens)
        )
        blocks = cfg.stage_blocks()
        dims, lens, n = self.hidden_dims, self.seq_lens, self.num_stages
        byte_dim = dims[-1]

        self.start_tokens = nn.ParameterList(nn.Parameter(torch.randn(d)) for d in dims)
        self.pos_embs = nn.ModuleList()
        for d, p, blk in zip(dims, lens, blocks, strict=True):
            if blk.pos_emb_type == "fixed":
                self.pos_embs.append(nn.Embedding(p, d))
            elif blk.pos_emb_type == "rope":
                self.pos_embs.append(InterleavedRoPE(d))
            else:
                self.pos_embs.append(nn.Identity())
        # token embedding of each stage: patches of bytes for global stages, bytes for the last
        self.token_embs = nn.ModuleList(
            PatchEmbedding(
                cfg.num_tokens, cfg.pad_token_id, byte_dim, math.prod(lens[k + 1 :]), dims[k]
            )
            for k in range(n - 1)
        )
        self.token_embs.append(nn.Embedding(cfg.num_tokens, byte_dim, padding_idx=cfg.pad_token_id))
        self.stages = nn.ModuleList(
            blk.to_model(model_dim=d, num_layers=layers)
            for blk, d, layers in zip(blocks, dims, cfg.num_layers, strict=True)
        )
        self.to_next_stage = nn.ModuleList(
            nn.Linear(dims[k], dims[k + 1] * lens[k + 1]) for k in range(n - 1)
        )
        self.to_logits = nn.Linear(byte_dim, cfg.num_tokens)

    # ----------------------------------------------------------------------------- checks

    @torch.compiler.disable
    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must hold integer ids, got dtype {input_ids.dtype}")
        n = self.num_stages
        if input_ids.ndim == 2:
            if input_ids.shape[1] > self.max_seq_len:
                raise ValueError(
                    f"input_ids has length {input_ids.shape[1]}, longer than the model's "
                    f"context prod(seq_lens)={self.max_seq_len} (seq_lens={self.seq_lens})"
                )
        elif input_ids.ndim == n + 1 and n > 1:
            inner, outer = list(input_ids.shape[2:]), input_ids.shape[1]
            if inner != self.seq_lens[1:] or outer > self.seq_lens[0]:
                raise ValueError(
                    f"nested input_ids must have shape (B, P1<={self.seq_lens[0]}, "
                    f"{', '.join(map(str, self.seq_lens[1:]))}), got {tuple(input_ids.shape)}"
                )
        else:
            want = "(B, L)" + (f" or (B, P1, ..., P{n})" if n > 1 else "")
            raise ValueError(f"input_ids must have shape {want}, got {tuple(input_ids.shape)}")
        if input_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            if lo < 0 or hi >= self.num_tokens:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"input_ids holds id {bad}, outside [0, num_tokens={self.num_tokens})"
                )

    # ----------------------------------------------------------------------------- forward

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the stage stack (embeddings, stages, projections) in place.

        Input checks, the loss and generation stay eager; the state dict is unchanged.
        Arguments go to ``torch.compile``.
        """
        self._hidden = torch.compile(self._hidden, *args, **kwargs)  # type: ignore[method-assign]

    def _embed(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Token embeddings per stage for nested ids (B, P1', P2, ..., Pn).

        Returns [(B, P1', D1), (B, P1', P2, D2), ..., (B, P1', ..., Pn, Dn)].
        """
        embs = []
        for k in range(self.num_stages):
            stage_ids = ids.flatten(k + 2) if k < self.num_stages - 1 else ids  # (B, .., Pk, R)
            positions = torch.arange(stage_ids.shape[k + 1], device=ids.device)  # (Pk,)
            embs.append(self._embed_stage(k, stage_ids, positions))  # (B, P1', ..., Pk, Dk)
        return embs

    def _embed_stage(self, k: int, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Stage k's token embedding plus its positional embedding.

        ids: (..., S, Rk) patches of bytes for a global stage, (..., S) bytes for the local
        one; positions: the positions of the S tokens in their sequence, broadcastable to
        (..., S). Returns (..., S, Dk).
        """
        x = self.token_embs[k](ids)  # (..., S, Dk)
        pos = self.pos_embs[k]
        if isinstance(pos, nn.Embedding):
            x = x + pos.weight[positions]
        elif isinstance(pos, InterleavedRoPE):
            x = pos(x, positions=positions)
        return x

    def _run_stage(self, k: int, x: torch.Tensor) -> torch.Tensor:
        stage, chunks = self.stages[k], self.checkpoint_chunks[k]
        if chunks is None or not (self.training and torch.is_grad_enabled()):
            return stage(x)
        return torch.cat(
            [checkpoint(stage, part, use_reentrant=False) for part in x.chunk(chunks, dim=0)]
        )

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Run all stages on nested ids (B, P1', ..., Pn): local output (Nn, 1 + Pn, Dn)."""
        prev: torch.Tensor | None = None
        out = ids.new_empty(0)
        for k, emb in enumerate(self._embed(ids)):
            x = emb.flatten(0, -3)  # (Nk, Pk, Dk)
            if prev is not None:
                x = x + prev
            start = repeat(self.start_tokens[k], "d -> n 1 d", n=x.shape[0]).to(x.dtype)
            out = self._run_stage(k, torch.cat((start, x), dim=1))  # (Nk, 1 + Pk, Dk)
            if k < self.num_stages - 1:
                nxt = self.to_next_stage[k](out[:, :-1])  # (Nk, Pk, P(k+1) * D(k+1))
                prev = rearrange(nxt, "n p (q d) -> (n p) q d", q=self.seq_lens[k + 1])
        return out

    def _nest(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, P1', P2, ..., Pn), padding the tail with the pad id."""
        inner = self.seq_lens[1:]
        pad = -ids.shape[1] % math.prod(inner)
        ids = F.pad(ids, (0, pad), value=self.pad_token_id)
        return ids.reshape(ids.shape[0], -1, *inner)

    def _first_byte_hidden(self, batch: int, device: torch.device) -> torch.Tensor:
        """Local output at the start token of the first patch: predicts byte 0. (B, 1, Dn)"""
        start = self.start_tokens[-1].to(device)
        return self.stages[-1](repeat(start, "d -> b 1 d", b=batch))

    @overload
    def forward(
        self,
        input_ids: torch.Tensor,
        return_type: Literal[MBLMReturnType.LOSS_LOGITS],
        loss_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def forward(
        self,
        input_ids: torch.Tensor,
        return_type: Literal[
            MBLMReturnType.LOSS, MBLMReturnType.LOGITS, MBLMReturnType.HIDDEN_STATE
        ] = ...,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor: ...

    def forward(
        self,
        input_ids: torch.Tensor,
        return_type: MBLMReturnType = MBLMReturnType.LOSS,
        loss_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One forward pass.

        Args:
            input_ids: byte ids, (B, L) with L <= prod(seq_lens), or nested
                (B, P1', P2, ..., Pn) with P1' <= P1 (then L = P1' * P2 * ... * Pn).
            return_type: LOGITS (B, L, V): position i holds the prediction of byte i+1;
                LOSS: mean cross-entropy of predicting every byte (byte 0 included) over
                non-pad positions; LOSS_LOGITS: both; HIDDEN_STATE (B, L, Dn): the local
                stage's output after each byte. Nested input gives nested outputs.
            loss_mask: optional weights, same shape as input_ids; the loss is
                sum(weight * ce) / count(weight != 0) over non-pad positions (0 if none).
        """
        return_type = MBLMReturnType(return_type)
        self._check_ids(input_ids)
        nested = input_ids.ndim > 2
        batch, device = input_ids.shape[0], input_ids.device
        targets = input_ids.flatten(1) if nested else input_ids  # (B, L)
        flat_len = targets.shape[1]
        if loss_mask is not None and tuple(loss_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"loss_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(loss_mask.shape)}"
            )

        if flat_len == 0:
            first = self._first_byte_hidden(batch, device)  # (B, 1, Dn)
            after = first[:, :0]  # (B, 0, Dn)
        else:
            out = self._hidden(input_ids if nested else self._nest(input_ids))  # (Nn, 1+Pn, Dn)
            after = out[:, 1:].reshape(batch, -1, out.shape[-1])[:, :flat_len]  # (B, L, Dn)
            # the local start token of each sequence's first patch predicts byte 0
            first = out[:: out.shape[0] // batch, :1]  # (B, 1, Dn)

        def shape_out(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(*input_ids.shape, t.shape[-1]) if nested else t

        if return_type == MBLMReturnType.HIDDEN_STATE:
            return shape_out(after)
        if return_type == MBLMReturnType.LOGITS:
            if flat_len == 0:
                return self.to_logits(first)  # (B, 1, V): the prediction of byte 0
            return shape_out(self.to_logits(after))

        logits_all = self.to_logits(torch.cat((first, after), dim=1))  # (B, 1 + L, V)
        loss = self._loss(logits_all[:, :flat_len], targets, loss_mask, nested)
        if return_type == MBLMReturnType.LOSS:
            return loss
        return loss, shape_out(logits_all[:, 1:])

    def _loss(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss_mask: torch.Tensor | None,
        nested: bool,
    ) -> torch.Tensor:
        ce = F.cross_entropy(
            logits.transpose(1, 2).float(),  # (B, V, L)
            targets.long(),
            ignore_index=self.pad_token_id,
            reduction="none",
        )  # (B, L)
        weight = (targets != self.pad_token_id).to(ce.dtype)  # (B, L)
        if loss_mask is not None:
            mask = loss_mask.flatten(1) if nested else loss_mask
            weight = weight * mask.to(ce.dtype)
        count = (weight != 0).sum()
        return (ce * weight).sum() / count.clamp(min=1)

    # ----------------------------------------------------------------------------- generate

    @torch.inference_mode()
    def generate(
        self,
        prime: torch.Tensor | Sequence[torch.Tensor] | None = None,
        stream: ByteStreamer | Sequence[ByteStreamer | None] | None = None,
        num_tokens_to_generate: int | None = None,
        end_of_gen_token_id: int = -1,
        temperature: float = 1.0,
        filter_thres: float | None = None,
        enable_progress: bool = True,
        *,
        top_k: int | None = None,
        top_p: float | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> Any:
        """Sample bytes autoregressively; returns each prompt followed by its generated ids.

        Greedy by default (the seed's ``filter_thres=1.0``). Cached decoding runs the local
        stage once per byte and a global stage once per completed patch
        (:mod:`mblm.model.decode`); ``use_cache=False`` reruns the whole model for every
        byte. Both give the same output for the same random draws. Call ``model.eval()``
        first if the model has dropout.

        Args:
            prime: the prompt. A 1-D tensor (L,) -> returns (L + N,); a 2-D tensor (B, L),
                one prompt per row -> returns (B, L + N), rows that stopped early padded
                with ``pad_token_id`` after their end token; a list of 1-D tensors of any
                lengths -> returns a list of 1-D tensors (each prompt and its new ids).
                None: an empty prompt, returns (N,).
            stream: a ByteStreamer receiving every generated id as it is sampled (one
                prompt only), or one ByteStreamer (or None) per prompt.
            num_tokens_to_generate: how many ids to sample per prompt; None fills each
                prompt's remaining context. A prompt plus this beyond the model's context
                (``prod(seq_lens)``) is a ValueError.
            end_of_gen_token_id: a row stops after sampling this id.
            temperature: divides the logits before sampling (> 0).
            filter_thres: the seed's top-k: keep the ``max(int((1 - filter_thres) * V), 1)``
                largest logits; 1.0 keeps one (greedy). None means 1.0 unless ``top_k`` or
                ``top_p`` is given, then no top-k filter beyond ``top_k``.
            enable_progress: show a progress bar when not streaming.
            top_k: keep the ``top_k`` largest logits (replaces ``filter_thres``).
            top_p: nucleus sampling: keep the most likely ids until their probability
                (after top-k and temperature) reaches ``top_p`` (in (0, 1]).
            use_cache: cached incremental decoding (default) or full recomputation.
            generator: the torch.Generator of the sampling noise (default: torch's global
                RNG on the model's device).
            seed: a seed for a fresh CPU generator instead of ``generator``: the same seed
                draws the same noise on any device, and gives the same output with or
                without the cache.
        """
        device = next(self.parameters()).device
        prompts, shape = self._generation_prompts(prime, device)
        for p in prompts:
            self._check_ids(p[None])
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        k = self._top_k(filter_thres, top_k, top_p)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if seed is not None:
            if generator is not None:
                raise ValueError("give a generator or a seed, not both")
            generator = torch.Generator().manual_seed(seed)
        budgets = []
        for p in prompts:
            room = self.max_seq_len - len(p)
            total = room if num_tokens_to_generate is None else num_tokens_to_generate
            if total < 0 or total > room:
                raise ValueError(
                    f"cannot generate {total} bytes after a {len(p)}-byte prompt: the model's "
                    f"context is {self.max_seq_len} bytes (seq_lens={self.seq_lens})"
                )
            budgets.append(total)
        streams = self._generation_streams(stream, len(prompts))
        try:
            new = decode(
                self,
                prompts,
                budgets,
                Sampler(temperature=temperature, top_k=k, top_p=top_p, generator=generator),
                use_cache=use_cache,
                streams=streams,
                end_of_gen_token_id=end_of_gen_token_id,
                progress=enable_progress and streams is None,
            )
        finally:
            for s in streams or []:
                if s is not None:
                    s.flush()
        rows = [
            torch.cat((p, p.new_tensor(ids, dtype=torch.long)))
            for p, ids in zip(prompts, new, strict=True)
        ]
        if shape == "list":
            return rows
        if shape == "1d":
            return rows[0]
        width = max(len(r) for r in rows)
        return torch.stack([F.pad(r, (0, width - len(r)), value=self.pad_token_id) for r in rows])

    def _top_k(self, filter_thres: float | None, top_k: int | None, top_p: float | None) -> int:
        if filter_thres is not None and not 0.0 <= filter_thres <= 1.0:
            raise ValueError(f"filter_thres must be in [0, 1], got {filter_thres}")
        if top_k is not None:
            if top_k < 1:
                raise ValueError(f"top_k must be >= 1, got {top_k}")
            return min(top_k, self.num_tokens)
        if filter_thres is None:
            filter_thres = 0.0 if top_p is not None else 1.0
        return max(int((1 - filter_thres) * self.num_tokens), 1)

    @staticmethod
    def _generation_prompts(
        prime: torch.Tensor | Sequence[torch.Tensor] | None, device: torch.device
    ) -> tuple[list[torch.Tensor], str]:
        """The prompts as 1-D long tensors on ``device``, and the output shape to return."""
        if prime is None:
            return [torch.empty(0, dtype=torch.long, device=device)], "1d"
        if isinstance(prime, torch.Tensor):
            if prime.ndim == 1:
                return [prime.to(device)], "1d"
            if prime.ndim == 2:
                return list(prime.to(device).unbind(0)), "2d"
            raise ValueError(f"prime must have shape (L,) or (B, L), got {tuple(prime.shape)}")
        prompts = list(prime)
        if not prompts:
            raise ValueError("prime is an empty list: give at least one prompt")
        for i, p in enumerate(prompts):
            if not isinstance(p, torch.Tensor) or p.ndim != 1:
                what = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
                raise ValueError(f"prime[{i}] must be a 1-D tensor, got {what}")
        return [p.to(device) for p in prompts], "list"

    @staticmethod
    def _generation_streams(
        stream: ByteStreamer | Sequence[ByteStreamer | None] | None, batch: int
    ) -> list[ByteStreamer | None] | None:
        if stream is None:
            return None
        if isinstance(stream, ByteStreamer):
            if batch != 1:
                raise ValueError(
                    f"one ByteStreamer for {batch} prompts: give a list of {batch} streamers"
                )
            return [stream]
        streams = list(stream)
        if len(streams) != batch:
            raise ValueError(f"{len(streams)} streamers for {batch} prompts")
        return streams
