"""Mamba-2 stage: the chunked SSD scan, the stage module, its step and its config."""

import math

import pytest
import torch
from pydantic import ValidationError

import mblm.model.mamba as mamba
from mblm.model.mamba import (
    HAS_MAMBA_SSM,
    Mamba2Stage,
    MambaBlock,
    ssd_chunked,
    ssd_reference,
)

FIELDS = {"d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8}


def ssd_inputs(l: int, b: int = 2, h: int = 3, p: int = 4, n: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g)  # (b, l, h, p)
    dt = torch.rand(b, l, h, generator=g) * 0.5 + 0.01  # (b, l, h)
    A = -torch.rand(h, generator=g) * 4 - 0.5  # (h,)
    B = torch.randn(b, l, n, generator=g)  # (b, l, n)
    C = torch.randn(b, l, n, generator=g)  # (b, l, n)
    D = torch.randn(h, generator=g)  # (h,)
    state = torch.randn(b, h, p, n, generator=g)  # (b, h, p, n)
    return x, dt, A, B, C, D, state


@pytest.mark.parametrize("l", [1, 5, 8, 13, 16, 29])
@pytest.mark.parametrize("with_state", [False, True])
def test_ssd_chunked_equals_reference(l, with_state):
    x, dt, A, B, C, D, state = ssd_inputs(l)
    init = state if with_state else None
    y_ref, s_ref = ssd_reference(x, dt, A, B, C, D, initial_state=init)
    y, s = ssd_chunked(x, dt, A, B, C, D, chunk_size=8, initial_state=init)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_ssd_chunked_without_d_and_many_chunks():
    x, dt, A, B, C, _, _ = ssd_inputs(37)
    y_ref, s_ref = ssd_reference(x, dt, A, B, C)
    y, s = ssd_chunked(x, dt, A, B, C, chunk_size=2)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(s, s_ref)


def test_ssd_chunked_gradients_match_reference():
    inputs = [t.requires_grad_() for t in ssd_inputs(21)]
    x, dt, A, B, C, D, state = inputs
    weight = torch.randn(x.shape)

    def grads(fn, **kw):
        for t in inputs:
            t.grad = None
        y, s = fn(x, dt, A, B, C, D, initial_state=state, **kw)
        ((y * weight).sum() + s.sum()).backward()
        return [t.grad.clone() for t in inputs]

    for got, want in zip(grads(ssd_chunked, chunk_size=8), grads(ssd_reference), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ssd_chunked_strong_decay_stays_finite():
    # long chunks with strong decay: exp of large positive segment sums must never be formed.
    # Differences of large float32 cumsums lose a few digits (as in mamba-ssm's kernel).
    x, dt, A, B, C, D, _ = ssd_inputs(64)
    dt = (dt * 20).requires_grad_()
    y, s = ssd_chunked(x, dt, A * 10, B, C, D, chunk_size=64)
    (y.sum() + s.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(dt.grad).all()
    y_ref = ssd_reference(x, dt.detach(), A * 10, B, C, D)[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)


def make_stage(num_layers=2, dim=16, seed=0, **kw) -> Mamba2Stage:
    torch.manual_seed(seed)
    return Mamba2Stage(dim, num_layers, d_state=8, d_conv=4, expand=2, headdim=8, **kw).eval()


def test_stage_state_dict_matches_mamba_ssm_names():
    d, d_state, d_conv, expand, headdim = 16, 8, 4, 2, 8
    d_inner = expand * d
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * d_state
    want = {"norm_f.weight": (d,)}
    for i in range(2):
        want |= {
            f"layers.{i}.norm.weight": (d,),
            f"layers.{i}.mixer.in_proj.weight": (2 * d_inner + 2 * d_state + nheads, d),
            f"layers.{i}.mixer.conv1d.weight": (conv_dim, 1, d_conv),
            f"layers.{i}.mixer.conv1d.bias": (conv_dim,),
            f"layers.{i}.mixer.dt_bias": (nheads,),
            f"layers.{i}.mixer.A_log": (nheads,),
            f"layers.{i}.mixer.D": (nheads,),
            f"layers.{i}.mixer.norm.weight": (d_inner,),
            f"layers.{i}.mixer.out_proj.weight": (d, d_inner),
        }
    stage = make_stage()
    assert {k: tuple(v.shape) for k, v in stage.state_dict().items()} == want


def test_stage_init():
    stage = make_stage(num_layers=4)
    for layer in stage.layers:
        mixer = layer.mixer
        for p in (mixer.dt_bias, mixer.A_log, mixer.D):
            assert p._no_weight_decay
        assert torch.all((mixer.A_log.exp() >= 1) & (mixer.A_log.exp() <= 16))
        assert torch.all(mixer.D == 1)
        dt = torch.nn.functional.softplus(mixer.dt_bias)
        assert torch.all((dt >= 1e-3 - 1e-6) & (dt <= 0.1 + 1e-6))
        # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in), rescaled by 1/sqrt(num_layers)
        bound = 1 / math.sqrt(mixer.d_inner) / math.sqrt(4)
        assert mixer.out_proj.weight.abs().max() <= bound


def test_stage_forward_shape_and_causality():
    stage = make_stage()
    x = torch.randn(2, 11, 16)
    y = stage(x)
    assert y.shape == x.shape
    t = 6
    x2 = x.clone()
    x2[:, t] += torch.randn(2, 16)
    y2 = stage(x2)
    torch.testing.assert_close(y2[:, :t], y[:, :t])
    assert not torch.allclose(y2[:, t], y[:, t])


@pytest.mark.parametrize("chunk", [4, 64])
def test_step_equals_forward(monkeypatch, chunk):
    monkeypatch.setattr(mamba, "TORCH_CHUNK_SIZE", chunk)  # several chunks or one
    stage = make_stage()
    x = torch.randn(3, 13, 16)
    full = stage(x)
    state = stage.init_state(3, x.device, x.dtype)
    outs = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, state = stage.step(x[:, t : t + 1], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)
    conv, ssm = state[0]
    assert conv.shape == (3, 32 + 2 * 8, 4) and ssm.shape == (3, 4, 8, 8)


def test_dropout_only_in_training():
    stage = make_stage(dropout=0.5)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(stage(x), stage(x))
    stage.train()
    assert not torch.allclose(stage(x), stage(x))


def test_block_builds_the_stage():
    block = MambaBlock(**FIELDS, dropout=0.1)
    assert block.block_type == "mamba2"
    stage = block.to_model(16, 3)
    assert isinstance(stage, Mamba2Stage) and len(stage.layers) == 3
    assert stage.layers[0].mixer.nheads == 4 and stage.layers[0].dropout.p == 0.1
    block.check_stage(16, 8)


@pytest.mark.parametrize(
    "field, value",
    [("d_state", 0), ("d_conv", -1), ("expand", 0), ("headdim", 0), ("dropout", 1.0)],
)
def test_block_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        MambaBlock(**{**FIELDS, field: value})


def test_block_rejects_unknown_fields():
    with pytest.raises(ValidationError, match="attn_num_heads"):
        MambaBlock(**FIELDS, attn_num_heads=2)


def test_check_stage_rejects_headdim_not_dividing():
    block = MambaBlock(**{**FIELDS, "headdim": 64})
    with pytest.raises(
        ValueError, match=r"headdim=64 does not divide expand\*hidden_dim=2\*100=200"
    ):
        block.check_stage(100, 8)


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_MAMBA_SSM), reason="needs CUDA and mamba-ssm"
)
def test_mamba_ssm_kernels_match_pure_torch():
    stage = make_stage(num_layers=2, dim=64).cuda()
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)  # > one 256-chunk

    def run(use_kernels: bool):
        for layer in stage.layers:
            layer.mixer.use_kernels = use_kernels
        x.grad = None
        stage.zero_grad()
        y = stage(x)
        y.pow(2).mean().backward()
        return y.detach(), x.grad.clone(), stage.layers[0].mixer.in_proj.weight.grad.clone()

    fused, pure = run(True), run(False)
    for a, b in zip(fused, pure, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=5e-3)
