"""Mamba-2 stage block: a pre-norm residual stack of Mamba-2 (SSD) mixers.

The module's parameters are named and shaped exactly like mamba-ssm's ``MixerModel`` (without
embeddings) built from ``Mamba2`` mixers with ``rms_norm=True`` and ``d_intermediate=0``, so
state dicts move freely between this module and the reference GPU model.

Two execution paths share the parameters:

- on CUDA with ``mamba_ssm`` and ``causal_conv1d`` installed, the fused kernels
  (``causal_conv1d_fn`` and ``mamba_chunk_scan_combined``) run the conv and the scan;
- everywhere else a chunked state-space-duality (SSD) scan in plain PyTorch
  (:func:`ssd_chunked`) runs, fast enough to train on CPU.

Shape letters: ``b`` batch, ``l`` sequence length, ``h`` heads, ``p`` head dim, ``n`` state
size, ``c`` number of chunks, ``q`` chunk length.
"""

from __future__ import annotations

import math
from typing import Literal, cast

import torch
import torch.nn.functional as F
from einops import rearrange
from pydantic import Field
from torch import nn

from mblm.model.block import StageBlock

try:
    from causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    HAS_MAMBA_SSM = True
except ImportError:  # CPU installs: the pure PyTorch path is used
    causal_conv1d_fn = None
    mamba_chunk_scan_combined = None
    HAS_MAMBA_SSM = False

#: longest chunk of the pure PyTorch scan; any value gives the same result (up to rounding),
#: 64 was the fastest on CPU for MBLM's stage lengths. The mixer splits a sequence into
#: equal chunks of at most this length to keep tail padding small.
TORCH_CHUNK_SIZE = 64

#: one layer's cache for :meth:`Mamba2Stage.step`: conv state (b, conv_dim, d_conv) and
#: SSM state (b, h, p, n)
LayerState = tuple[torch.Tensor, torch.Tensor]


class MambaBlock(StageBlock):
    """Mamba-2 stage block (SSD mixers with a gated RMSNorm, mamba-ssm's ``Mamba2``)."""

    d_state: int = Field(gt=0, description="SSM state size per head")
    d_conv: int = Field(gt=0, description="Width of the causal depthwise convolution")
    expand: int = Field(gt=0, description="Expansion factor: inner width is expand * model dim")
    headdim: int = Field(gt=0, description="Head dimension; heads = expand * model dim / headdim")
    dropout: float = Field(
        default=0.0, ge=0.0, lt=1.0, description="Dropout on each mixer's output while training"
    )
    block_type: Literal["mamba2"] = Field(default="mamba2", description="Registry name")

    def check_stage(self, model_dim: int, seq_len: int) -> None:
        super().check_stage(model_dim, seq_len)
        d_inner = self.expand * model_dim
        if d_inner % self.headdim:
            raise ValueError(
                f"headdim={self.headdim} does not divide expand*hidden_dim="
                f"{self.expand}*{model_dim}={d_inner}"
            )

    def to_model(self, model_dim: int, num_layers: int) -> Mamba2Stage:
        return Mamba2Stage(
            model_dim=model_dim,
            num_layers=num_layers,
            d_state=self.d_state,
            d_conv=self.d_conv,
            expand=self.expand,
            headdim=self.headdim,
            dropout=self.dropout,
        )


# --------------------------------------------------------------------------------------------
# SSD scan
# --------------------------------------------------------------------------------------------


def segsum(a_cumsum: torch.Tensor) -> torch.Tensor:
    """Segment sums from a cumulative sum: ``out[..., i, j] = cs[i] - cs[j]`` for ``j <= i``.

    That is the sum of ``a[j+1..i]``, the log-decay from position ``j`` to ``i``. Entries above
    the diagonal are ``-inf`` (set before any ``exp``, so ``exp`` gives 0 without overflow and
    the backward pass stays finite).

    Shapes: ``a_cumsum`` (..., t) -> (..., t, t).
    """
    t = a_cumsum.shape[-1]
    diff = a_cumsum[..., :, None] - a_cumsum[..., None, :]  # (..., t, t)
    causal = torch.ones(t, t, dtype=torch.bool, device=a_cumsum.device).tril()
    return diff.masked_fill(~causal, -math.inf)


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential SSD recurrence, one time step at a time (slow; a reference for tests).

    For each head: ``state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)`` and
    ``y_t = state_t @ C_t + D * x_t``. B and C are shared by all heads (one group).

    Shapes:
        x: (b, l, h, p); dt: (b, l, h), already positive (after softplus); A: (h,), negative;
        B, C: (b, l, n); D: (h,) or None; initial_state: (b, h, p, n) or None.

    Returns:
        y (b, l, h, p) and the final state (b, h, p, n).
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    state = x.new_zeros(b, h, p, n) if initial_state is None else initial_state
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)  # (b, h)
        dx = dt[:, t, :, None] * x[:, t]  # (b, h, p)
        state = state * decay[:, :, None, None] + dx[..., None] * B[:, t, None, None, :]
        y = torch.einsum("bhpn,bn->bhp", state, C[:, t])  # (b, h, p)
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), state  # (b, l, h, p), (b, h, p, n)


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    chunk_size: int = TORCH_CHUNK_SIZE,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan (state space duality) in plain PyTorch; same result as
    :func:`ssd_reference`.

    The sequence is cut into chunks of ``chunk_size`` (the tail zero-padded; padded steps
    have ``dt = 0`` and so neither decay nor add to the state). Within a chunk, outputs come
    from the masked quadratic form ``(C B^T * exp(segsum(dt*A))) @ (dt*x)``; each chunk's
    end state is passed on by a short loop over chunks (elementwise work); the state
    entering each chunk then adds ``exp(cumsum(dt*A)) * C @ state^T`` to its outputs.
    Heads share B and C, so ``C B^T`` is computed once per chunk and the state matmuls fold
    heads into their rows (no broadcast copies); all work is batched matmuls.
    Computes in float32 (or float64 for float64 input) and returns ``x.dtype``.

    Shapes:
        x: (b, l, h, p); dt: (b, l, h), already positive (after softplus); A: (h,), negative;
        B, C: (b, l, n), shared by all heads; D: (h,) or None;
        initial_state: (b, h, p, n) or None.

    Returns:
        y (b, l, h, p) and the final state (b, h, p, n) in the compute dtype.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, l, h, p = x.shape
    n = B.shape[-1]
    out_dtype = x.dtype
    cdt = torch.promote_types(x.dtype, torch.float32)  # compute dtype: at least float32
    x_f, dt, A, B, C = (t.to(cdt) for t in (x, dt, A, B, C))
    q = chunk_size
    pad = (-l) % q
    if pad:
        x_f = F.pad(x_f, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, pad))

    c = x_f.shape[1] // q
    xdt = rearrange(x_f * dt[..., None], "b (c q) h p -> b c q h p", q=q)  # (b, c, q, h, p)
    a_cs = torch.cumsum(rearrange(dt * A, "b (c q) h -> b c h q", q=q), dim=-1)  # (b, c, h, q)
    Bc = rearrange(B, "b (c q) n -> b c q n", q=q)  # (b, c, q, n)
    Cc = rearrange(C, "b (c q) n -> b c q n", q=q)  # (b, c, q, n)

    # 1. outputs from inputs of the same chunk (diagonal blocks), one q x q matrix per head
    CB = Cc @ Bc.transpose(-1, -2)  # (b, c, q, q)
    L = torch.exp(segsum(a_cs))  # (b, c, h, q, q)
    y_diag = (L * CB[:, :, None]) @ xdt.transpose(2, 3)  # (b, c, h, q, p)

    # 2. each chunk's own end state (as if it started from zero); heads folded into rows
    decay_to_end = torch.exp(a_cs[..., -1:] - a_cs).transpose(2, 3)  # (b, c, q, h)
    xdt_end = rearrange(xdt * decay_to_end[..., None], "b c q h p -> b c q (h p)")
    states = xdt_end.transpose(-1, -2) @ Bc  # (b, c, h*p, n)

    # 3. pass states across chunks: entry z is the state entering chunk z (z = c: final)
    if initial_state is None:
        init = states.new_zeros(b, 1, h * p, n)
    else:
        init = rearrange(initial_state.to(cdt), "b h p n -> b 1 (h p) n")
    chunk_decay = torch.exp(a_cs[..., -1])  # (b, c, h): decay across each whole chunk
    run = rearrange(init[:, 0], "b (h p) n -> b h p n", h=h)  # (b, h, p, n)
    passed = [run]
    for i in range(c):  # c = l / chunk_size steps of elementwise work
        local = rearrange(states[:, i], "b (h p) n -> b h p n", h=h)  # (b, h, p, n)
        run = run * chunk_decay[:, i, :, None, None] + local
        passed.append(run)
    states = rearrange(torch.stack(passed, dim=1), "b z h p n -> b z (h p) n")  # (b, c+1, h*p, n)
    final_state = rearrange(states[:, -1], "b (h p) n -> b h p n", h=h)  # (b, h, p, n)

    # 4. outputs from the state entering each chunk (off-diagonal blocks)
    y_off = Cc @ states[:, :-1].transpose(-1, -2)  # (b, c, q, h*p)
    y_off = rearrange(y_off, "b c q (h p) -> b c q h p", h=h)
    y_off = y_off * torch.exp(a_cs).transpose(2, 3)[..., None]  # (b, c, q, h, p)

    y = y_off + y_diag.transpose(2, 3)  # (b, c, q, h, p)
    y = rearrange(y, "b c q h p -> b (c q) h p")[:, :l]  # (b, l, h, p)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x_f[:, :l]
    return y.to(out_dtype), final_state


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The SSM state's dtype for a model in ``dtype``: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


class RMSNormGated(nn.Module):
    """Gated RMSNorm (mamba-ssm's, ``norm_before_gate=False``, one group):
    ``rmsnorm(x * silu(z)) * weight``."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        cdt = torch.promote_types(dtype, torch.float32)  # float32, float64 for float64 input
        x = x.to(cdt) * F.silu(z.to(cdt))
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (x * self.weight.to(cdt)).to(dtype)


class Mamba2Mixer(nn.Module):
    """One Mamba-2 mixer (mamba-ssm ``Mamba2`` with default options, ``ngroups=1``):
    (b, l, D) -> (b, l, D), causal."""

    def __init__(
        self,
        model_dim: int,
        d_state: int,
        d_conv: int,
        expand: int,
        headdim: int,
        chunk_size: int = 256,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model = model_dim
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * model_dim
        if self.d_inner % headdim:
            raise ValueError(
                f"headdim={headdim} does not divide expand*hidden_dim="
                f"{expand}*{model_dim}={self.d_inner}"
            )
        self.headdim = headdim
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * d_state
        #: chunk length of the fused kernel (the pure path uses ``TORCH_CHUNK_SIZE``)
        self.chunk_size = chunk_size
        #: use the mamba-ssm kernels when available and the input is on CUDA
        self.use_kernels = True

        # in_proj output order: [z, x, B, C, dt]
        self.in_proj = nn.Linear(
            model_dim, 2 * self.d_inner + 2 * d_state + self.nheads, bias=False
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=True,
        )

        # dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
        dt = torch.exp(
            torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

        self.norm = RMSNormGated(self.d_inner, eps=1e-5)
        self.out_proj = nn.Linear(self.d_inner, model_dim, bias=False)

    def _kernels_for(self, u: torch.Tensor) -> bool:
        return HAS_MAMBA_SSM and self.use_kernels and u.is_cuda

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self._mix(u, with_state=False)[0]

    def prefill(self, u: torch.Tensor) -> tuple[torch.Tensor, LayerState]:
        """Forward over u (b, l, D), also returning the state after the last position (the
        cache :meth:`step` continues from)."""
        out, state = self._mix(u, with_state=True)
        assert state is not None
        return out, state

    def _mix(self, u: torch.Tensor, with_state: bool) -> tuple[torch.Tensor, LayerState | None]:
        seqlen = u.shape[1]
        zxbcdt = self.in_proj(u)  # (b, l, d_in_proj)
        z, xBC_in, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        conv_w = rearrange(self.conv1d.weight, "d 1 w -> d w")  # (conv_dim, d_conv)

        ssm_state: torch.Tensor | None = None
        if self._kernels_for(u):
            assert causal_conv1d_fn is not None and mamba_chunk_scan_combined is not None
            xBC = causal_conv1d_fn(
                xBC_in.transpose(1, 2), conv_w, bias=self.conv1d.bias, activation="silu"
            ).transpose(1, 2)  # (b, l, conv_dim)
            x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
            result = mamba_chunk_scan_combined(
                rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
                dt,
                -torch.exp(self.A_log.float()),  # A (h,)
                rearrange(B, "b l n -> b l 1 n"),
                rearrange(C, "b l n -> b l 1 n"),
                chunk_size=self.chunk_size,
                D=self.D,
                z=None,
                dt_bias=self.dt_bias,
                dt_softplus=True,
                return_final_states=with_state,
            )  # (b, l, h, p), and (b, h, p, n) with the state
            y, ssm_state = result if with_state else (result, None)
        else:
            xBC = self.conv1d(xBC_in.transpose(1, 2))[..., :seqlen]  # (b, conv_dim, l)
            xBC = F.silu(xBC.transpose(1, 2))  # (b, l, conv_dim)
            x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)
            cdt = _state_dtype(u.dtype)
            dt = F.softplus(dt.to(cdt) + self.dt_bias.to(cdt))  # (b, l, h)
            # balanced chunks of at most TORCH_CHUNK_SIZE: least padding, same result
            n_chunks = max(1, -(-seqlen // TORCH_CHUNK_SIZE))
            chunk_size = max(1, -(-seqlen // n_chunks))
            y, ssm_state = ssd_chunked(
                rearrange(x, "b l (h p) -> b l h p", p=self.headdim),
                dt,
                -torch.exp(self.A_log.to(cdt)),  # A (h,)
                B,
                C,
                self.D,
                chunk_size=chunk_size,
            )  # (b, l, h, p), (b, h, p, n)

        y = rearrange(y, "b l h p -> b l (h p)")  # (b, l, d_inner)
        out = self.out_proj(self.norm(y, z))  # (b, l, D)
        if not with_state:
            return out, None
        assert ssm_state is not None
        # the conv state holds the last d_conv conv inputs (zeros before the first position)
        conv_state = F.pad(xBC_in.transpose(1, 2), (self.d_conv - seqlen, 0))  # (b, conv_dim, w)
        return out, (conv_state, ssm_state.to(_state_dtype(u.dtype)))

    def init_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> LayerState:
        conv = torch.zeros(batch_size, self.conv_dim, self.d_conv, device=device, dtype=dtype)
        ssm = torch.zeros(
            batch_size,
            self.nheads,
            self.headdim,
            self.d_state,
            device=device,
            dtype=_state_dtype(dtype),
        )
        return conv, ssm

    def step(self, u: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        """One position: u (b, 1, D) -> (b, 1, D); returns new states (inputs untouched).

        Pure PyTorch on every device; like the pure PyTorch :meth:`forward`, the SSM part
        computes in float32, or float64 for a float64 model.
        """
        conv_state, ssm_state = state
        cdt = ssm_state.dtype
        zxbcdt = self.in_proj(u[:, 0])  # (b, d_in_proj)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

        conv_state = torch.cat([conv_state[..., 1:], xBC[..., None].to(conv_state.dtype)], dim=-1)
        conv_w = rearrange(self.conv1d.weight, "d 1 w -> d w")  # (conv_dim, d_conv)
        xBC = (conv_state * conv_w).sum(dim=-1)  # (b, conv_dim)
        if self.conv1d.bias is not None:
            xBC = xBC + self.conv1d.bias
        xBC = F.silu(xBC).to(u.dtype)
        x, B, C = torch.split(xBC, [self.d_inner, self.d_state, self.d_state], dim=-1)

        A = -torch.exp(self.A_log.to(cdt))  # (h,)
        dt = F.softplus(dt.to(cdt) + self.dt_bias.to(cdt))  # (b, h)
        x = rearrange(x, "b (h p) -> b h p", p=self.headdim).to(cdt)  # (b, h, p)
        dx = dt[..., None] * x  # (b, h, p)
        decay = torch.exp(dt * A)[..., None, None]  # (b, h, 1, 1)
        ssm_state = ssm_state * decay + dx[..., None] * B.to(cdt)[:, None, None, :]  # (b,h,p,n)
        y = (ssm_state @ C.to(cdt)[:, None, :, None])[..., 0]  # (b, h, p)
        y = y + self.D.to(cdt)[:, None] * x
        y = rearrange(y, "b h p -> b (h p)").to(u.dtype)  # (b, d_inner)
        out = self.out_proj(self.norm(y, z))  # (b, D)
        return out[:, None], (conv_state, ssm_state)


class Mamba2Layer(nn.Module):
    """Pre-norm residual layer: ``x + dropout(mixer(norm(x)))``."""

    def __init__(self, model_dim: int, mixer: Mamba2Mixer, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(model_dim, eps=1e-5)
        self.mixer = mixer
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.mixer(self.norm(x)))

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerState]:
        out, state = self.mixer.prefill(self.norm(x))
        return x + self.dropout(out), state

    def step(self, x: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        out, state = self.mixer.step(self.norm(x), state)
        return x + self.dropout(out), state


class Mamba2Stage(nn.Module):
    """A stack of Mamba-2 layers with a final RMSNorm: (N, S, D) -> (N, S, D), causal.

    Parameter names and shapes match mamba-ssm's ``MixerModel`` (no embedding) with
    ``Mamba2`` mixers, ``rms_norm=True`` and ``d_intermediate=0``.
    """

    def __init__(
        self,
        model_dim: int,
        num_layers: int,
        d_state: int,
        d_conv: int,
        expand: int,
        headdim: int,
        dropout: float = 0.0,
        chunk_size: int = 256,
    ) -> None:
        super().__init__()
        layers = [
            Mamba2Layer(
                model_dim,
                Mamba2Mixer(model_dim, d_state, d_conv, expand, headdim, chunk_size=chunk_size),
                dropout=dropout,
            )
            for _ in range(num_layers)
        ]
        self.layers = nn.ModuleList(layers)
        self.norm_f = nn.RMSNorm(model_dim, eps=1e-5)
        # prenorm residual rescale (mamba-ssm ``_init_weights`` with one residual per layer)
        for layer in layers:
            w = layer.mixer.out_proj.weight
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
            with torch.no_grad():
                w /= math.sqrt(num_layers)

    def _layers(self) -> list[Mamba2Layer]:
        return [cast(Mamba2Layer, layer) for layer in self.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm_f(x)

    def init_state(
        self, batch_size: int, device: torch.device | str | None, dtype: torch.dtype
    ) -> list[LayerState]:
        """Zero caches for :meth:`step`, one (conv, ssm) pair per layer: conv state
        (b, conv_dim, d_conv) in ``dtype``, SSM state (b, nheads, headdim, d_state) in float32
        (float64 for a float64 model)."""
        return [layer.mixer.init_state(batch_size, device, dtype) for layer in self._layers()]

    def prefill(self, x: torch.Tensor, max_len: int = 0) -> tuple[torch.Tensor, list[LayerState]]:
        """:meth:`forward` over x (N, S, D), also returning the caches after the last
        position, which :meth:`step` continues from (the same as stepping through x from
        :meth:`init_state`). ``max_len`` is unused: the state has a fixed size."""
        states = []
        for layer in self._layers():
            x, state = layer.prefill(x)
            states.append(state)
        return self.norm_f(x), states

    def step(
        self, x: torch.Tensor, state: list[LayerState]
    ) -> tuple[torch.Tensor, list[LayerState]]:
        """Process one new position: x (b, 1, D) -> (b, 1, D) and the updated caches.

        Pure PyTorch on any device; feeding a sequence position by position from
        :meth:`init_state` gives the same outputs as :meth:`forward` on the whole sequence.
        """
        new_state = []
        for layer, layer_state in zip(self._layers(), state, strict=True):
            x, layer_state = layer.step(x, layer_state)
            new_state.append(layer_state)
        return self.norm_f(x), new_state
