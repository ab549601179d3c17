"""Generation: cached incremental decoding equals full recomputation, batched prompts,
sampling options. Models are float64 so that greedy comparisons are not decided by rounding."""

from __future__ import annotations

import io

import pytest
import torch

from mblm import MBLM, MBLMModelConfig, MBLMReturnType
from mblm.model.block import StageBlock
from mblm.model.decode import CachedDecoder, RecomputeStage, Sampler, incremental
from mblm.utils.stream import ByteStreamer
from tests.conftest import tiny_config, tiny_model

R = MBLMReturnType

# tiny_config: 1 stage seq_lens [24]; 2 stages [6, 4]; 3 stages [6, 4, 3] (patches of 12 and
# 3 bytes). Prompt lengths: empty, ending mid-patch, ending exactly at a patch end.
PROMPT_LENGTHS = {1: [0, 5, 23], 2: [0, 3, 4, 9], 3: [0, 7, 12, 13, 35]}


def model64(block_type: str = "transformer", stages: int = 2, seed: int = 0) -> MBLM:
    return tiny_model(block_type, stages, seed).double()


def prompt(length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_cached_greedy_equals_recomputation(block_type, stages):
    model = model64(block_type, stages)
    for length in PROMPT_LENGTHS[stages]:
        p = prompt(length, seed=length)
        # fills the context: generation crosses patch boundaries of every stage
        cached = model.generate(p, enable_progress=False)
        full = model.generate(p, enable_progress=False, use_cache=False)
        assert cached.shape == (model.max_seq_len,)
        assert torch.equal(cached, full), f"prompt length {length}"


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_cached_logits_equal_forward_logits_for_rows_at_different_positions(block_type, stages):
    """Teacher forcing through the cached decoder: rows of different prompt lengths, fed in
    changing subsets, predict every byte as the full forward pass does."""
    model = model64(block_type, stages)
    seqs = torch.randint(0, 256, (3, model.max_seq_len), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        after = model(seqs, R.LOGITS)  # (3, T, V): position i predicts byte i + 1
        first = model(seqs[:, :0], R.LOGITS)  # (3, 1, V): predicts byte 0
        want = torch.cat((first, after), dim=1)  # want[:, i] predicts byte i
        lengths = [0, 5, 13 % model.max_seq_len]
        decoder = CachedDecoder(model, 3, torch.device("cpu"))
        logits = decoder.prefill([seqs[r, : lengths[r]] for r in range(3)])
        for r in range(3):
            torch.testing.assert_close(logits[r], want[r, lengths[r]], rtol=0, atol=1e-9)
        step = 0
        while any(n < model.max_seq_len for n in lengths):
            rows = [r for r in range(3) if lengths[r] < model.max_seq_len]
            if step % 3 == 2 and len(rows) > 1:
                rows = rows[1:]  # now and then a row sits out a step
            tokens = torch.zeros(3, dtype=torch.long)
            for r in rows:
                tokens[r] = seqs[r, lengths[r]]
            logits = decoder.feed(tokens, rows)
            for r in rows:
                lengths[r] += 1
                if lengths[r] < model.max_seq_len:
                    torch.testing.assert_close(logits[r], want[r, lengths[r]], rtol=0, atol=1e-9)
            step += 1


@pytest.mark.parametrize("prefix", [1, 4])
def test_stage_prefill_then_steps_equal_forward(block_type, prefix):
    stage = tiny_model(block_type, stages=1).stages[0].double()
    assert not isinstance(incremental(stage), RecomputeStage)  # built-ins have their own
    x = torch.randn(2, 9, 16, dtype=torch.float64)  # the 1-stage tiny model is 16 wide
    with torch.inference_mode():
        want = stage(x)
        out, state = stage.prefill(x[:, :prefix], 9)
        outs = [out]
        for t in range(prefix, 9):
            out, state = stage.step(x[:, t : t + 1], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), want, rtol=0, atol=1e-10)


class LSTM(torch.nn.Module):
    def __init__(self, dim: int, layers: int):
        super().__init__()
        self.lstm = torch.nn.LSTM(dim, dim, num_layers=layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class LSTMBlock(StageBlock):
    block_type: str = "lstm_generate_test"

    def to_model(self, model_dim: int, num_layers: int) -> torch.nn.Module:
        return LSTM(model_dim, num_layers)


def test_custom_block_falls_back_to_recomputation():
    cfg = tiny_config(stages=3).model_dump()
    cfg["block"] = [LSTMBlock(), cfg["block"], LSTMBlock()]
    torch.manual_seed(0)
    model = MBLM(MBLMModelConfig.model_validate(cfg)).eval().double()
    decoder = CachedDecoder(model, 1, torch.device("cpu"))
    assert [type(c.stage).__name__ for c in decoder.caches] == [
        "RecomputeStage",
        "TransformerDecoder",
        "RecomputeStage",
    ]
    prompts = [prompt(n, seed=n) for n in (0, 7, 12)]
    cached = model.generate(prompts, num_tokens_to_generate=30, enable_progress=False)
    full = model.generate(
        prompts, num_tokens_to_generate=30, enable_progress=False, use_cache=False
    )
    for a, b in zip(cached, full, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stages", [2, 3])
def test_batched_prompts_equal_one_by_one(block_type, stages):
    model = model64(block_type, stages)
    lengths = PROMPT_LENGTHS[stages][:4]
    prompts = [prompt(n, seed=10 + n) for n in lengths]
    batched = model.generate(prompts, num_tokens_to_generate=14, enable_progress=False)
    assert isinstance(batched, list) and len(batched) == len(prompts)
    for p, row in zip(prompts, batched, strict=True):
        alone = model.generate(p, num_tokens_to_generate=14, enable_progress=False)
        assert torch.equal(row, alone)
    # a 2-D prime: one prompt per row, same length
    same = torch.stack([prompt(5, seed=s) for s in range(3)])
    out = model.generate(same, num_tokens_to_generate=6, enable_progress=False)
    assert out.shape == (3, 11)
    for i in range(3):
        assert torch.equal(
            out[i], model.generate(same[i], num_tokens_to_generate=6, enable_progress=False)
        )


def test_sampling_draws_the_same_numbers_with_and_without_the_cache(block_type):
    model = model64(block_type, stages=3)
    prompts = [prompt(n, seed=n) for n in (0, 7, 12)]
    kw = dict(num_tokens_to_generate=25, temperature=0.8, top_k=40, top_p=0.95)
    cached = model.generate(prompts, seed=3, enable_progress=False, **kw)
    full = model.generate(prompts, seed=3, use_cache=False, enable_progress=False, **kw)
    again = model.generate(
        prompts, generator=torch.Generator().manual_seed(3), enable_progress=False, **kw
    )
    other = model.generate(prompts, seed=4, enable_progress=False, **kw)
    for a, b, c in zip(cached, full, again, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(not torch.equal(a, d) for a, d in zip(cached, other, strict=True))


def test_end_token_stops_each_row_on_its_own():
    model = model64(stages=2)
    prompts = [prompt(n, seed=n) for n in (2, 9)]
    free = model.generate(prompts, num_tokens_to_generate=12, enable_progress=False)
    stop = int(free[0][2 + 3])  # row 0 stops at its 4th new byte at the latest
    out = model.generate(
        prompts, num_tokens_to_generate=12, end_of_gen_token_id=stop, enable_progress=False
    )
    for p, row in zip(prompts, out, strict=True):
        alone = model.generate(
            p, num_tokens_to_generate=12, end_of_gen_token_id=stop, enable_progress=False
        )
        assert torch.equal(row, alone)
        new = row[len(p) :].tolist()
        assert stop not in new[:-1] and (new[-1] == stop or len(new) == 12)
    assert len(out[0]) <= 2 + 4
    # a 2-D prime: rows that stopped are padded after their end token
    same = torch.stack([prompt(3, seed=1), prompt(3, seed=2)])
    rows = [model.generate(r, None, 12, stop, enable_progress=False) for r in same]
    padded = model.generate(same, None, 12, stop, enable_progress=False)
    assert padded.shape == (2, max(len(r) for r in rows))
    for i, r in enumerate(rows):
        assert torch.equal(padded[i, : len(r)], r)
        assert (padded[i, len(r) :] == model.pad_token_id).all()


def test_streams_get_every_row_as_generated():
    model = model64(stages=2)
    prompts = [prompt(1), prompt(6)]
    bufs = [io.BytesIO(), io.BytesIO()]
    out = model.generate(prompts, stream=[ByteStreamer(b) for b in bufs], num_tokens_to_generate=7)
    for p, row, buf in zip(prompts, out, bufs, strict=True):
        assert buf.getvalue() == bytes(row[len(p) :].tolist())


# ---------------------------------------------------------------------------- sampling


def test_top_k_and_filter_thres_meaning():
    model = tiny_model(stages=2)
    assert model._top_k(None, None, None) == 1  # the seed's default: greedy
    assert model._top_k(0.9, None, None) == int(0.1 * 257)
    assert model._top_k(0.0, None, None) == 257
    assert model._top_k(1.0, 5, None) == 5  # top_k replaces filter_thres
    assert model._top_k(None, None, 0.9) == 257  # top_p alone: no top-k filter


def test_sampler_follows_the_distribution_and_top_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(20_000, 4)
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(Sampler(top_k=None, generator=gen)(logits), minlength=4)
    torch.testing.assert_close(counts / 20_000, probs, rtol=0, atol=0.015)
    # top_p keeps the most likely ids until their mass reaches top_p
    for top_p, kept in [(0.5, {0}), (0.6, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})]:
        picks = Sampler(top_k=None, top_p=top_p, generator=gen)(logits[:2000])
        assert set(picks.tolist()) == kept
    # a cold temperature or top_k=1 is greedy
    assert set(Sampler(temperature=1e-6, top_k=None, generator=gen)(logits).tolist()) == {0}
    assert set(Sampler(top_k=1, generator=gen)(logits).tolist()) == {0}


# ---------------------------------------------------------------------------- errors and edges


def test_full_context_prompt_generates_nothing_and_empty_budget_returns_prompt():
    model = tiny_model(stages=2)
    full = prompt(model.max_seq_len)
    assert torch.equal(model.generate(full, enable_progress=False), full)
    assert torch.equal(model.generate(prompt(3), num_tokens_to_generate=0), prompt(3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(prime=[prompt(3), prompt(20)], num_tokens_to_generate=10),
            r"cannot generate 10 bytes after a 20-byte prompt: the model's context is 24 bytes",
        ),
        (dict(prime=prompt(25)), r"length 25, longer than the model's context"),
        (dict(prime=prompt(3), top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(prime=prompt(3), top_k=0), r"top_k must be >= 1"),
        (dict(prime=prompt(3), filter_thres=1.5), r"filter_thres must be in \[0, 1\]"),
        (
            dict(prime=prompt(3), seed=1, generator=torch.Generator()),
            r"a generator or a seed, not both",
        ),
        (
            dict(prime=[prompt(3), prompt(4)], stream=ByteStreamer(io.BytesIO())),
            r"one ByteStreamer for 2 prompts",
        ),
        (dict(prime=torch.zeros(1, 2, 3, dtype=torch.long)), r"prime must have shape"),
        (dict(prime=[torch.zeros(2, 2, dtype=torch.long)]), r"prime\[0\] must be a 1-D"),
    ],
)
def test_bad_generation_requests_are_value_errors(kwargs, message):
    model = tiny_model(stages=2)  # context 24
    with pytest.raises(ValueError, match=message):
        model.generate(enable_progress=False, **kwargs)
