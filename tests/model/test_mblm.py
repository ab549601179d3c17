import io

import pytest
import torch
import torch.nn.functional as F

from mblm import MBLM, MBLMReturnType
from mblm.utils.stream import ByteStreamer
from tests.conftest import tiny_config, tiny_model

R = MBLMReturnType


def ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, length), generator=g)


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_shapes_of_every_return_type(block_type, stages):
    model = tiny_model(block_type, stages)
    for length in (1, 5, model.max_seq_len):
        x = ids(2, length)
        assert model(x, R.LOGITS).shape == (2, length, 257)
        assert model(x, R.HIDDEN_STATE).shape == (2, length, model.hidden_dims[-1])
        loss, logits = model(x, R.LOSS_LOGITS)
        assert loss.ndim == 0 and torch.isfinite(loss)
        torch.testing.assert_close(logits, model(x, R.LOGITS))
        torch.testing.assert_close(loss, model(x, R.LOSS))


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_causal_every_byte_predicted_only_from_the_past(block_type, stages):
    model = tiny_model(block_type, stages)
    length = model.max_seq_len
    x = ids(1, length)
    base = model(x, R.LOGITS)
    for j in (0, 3, length // 2, length - 1):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 256
        out = model(y, R.LOGITS)
        # logits[i] is the output after byte i: unchanged for i < j, changed at j
        torch.testing.assert_close(out[:, :j], base[:, :j])
        assert not torch.allclose(out[:, j], base[:, j])


@pytest.mark.parametrize("stages", [1, 2, 3])
def test_loss_is_cross_entropy_of_next_byte_predictions(block_type, stages):
    model = tiny_model(block_type, stages)
    x = ids(2, model.max_seq_len - 2)
    logits = model(x, R.LOGITS)  # predicts x[:, 1:]
    first = model(x[:, :0], R.LOGITS)  # prediction of byte 0 from nothing
    preds = torch.cat((first, logits[:, :-1]), dim=1)
    expected = F.cross_entropy(preds.transpose(1, 2), x)
    torch.testing.assert_close(model(x, R.LOSS), expected)


def test_pad_positions_are_ignored_and_weights_average_over_unmasked():
    model = tiny_model(stages=2)
    x = ids(2, 20)
    x[1, -4:] = model.pad_token_id
    logits = model(x, R.LOGITS)
    preds = torch.cat((model(x[:, :0], R.LOGITS), logits[:, :-1]), dim=1)
    ce = F.cross_entropy(preds.transpose(1, 2), x, reduction="none")
    valid = x != model.pad_token_id
    torch.testing.assert_close(model(x, R.LOSS), ce[valid].mean())
    weights = torch.rand(2, 20)
    weights[0, :5] = 0
    got = model(x, R.LOSS, loss_mask=weights)
    keep = valid & (weights != 0)
    torch.testing.assert_close(got, (ce * weights)[keep].sum() / keep.sum())
    zero = model(x, R.LOSS, loss_mask=torch.zeros(2, 20))
    assert zero.item() == 0.0
    zero.backward()  # still part of the graph


@pytest.mark.parametrize("stages", [2, 3])
def test_nested_input_matches_flat_input(block_type, stages):
    model = tiny_model(block_type, stages)
    x = ids(2, model.max_seq_len)
    nested = x.reshape(2, *model.seq_lens)
    torch.testing.assert_close(model(nested, R.LOSS), model(x, R.LOSS))
    torch.testing.assert_close(
        model(nested, R.LOGITS), model(x, R.LOGITS).reshape(*nested.shape, -1)
    )
    mask = torch.rand(2, model.max_seq_len)
    torch.testing.assert_close(
        model(nested, R.LOSS, loss_mask=mask.reshape(nested.shape)),
        model(x, R.LOSS, loss_mask=mask),
    )
    # fewer global patches than the maximum
    short = nested[:, :2]
    torch.testing.assert_close(model(short, R.LOSS), model(short.flatten(1), R.LOSS))


def test_hidden_state_keeps_every_position():
    model = tiny_model(stages=2)
    x = ids(1, 7)
    hidden = model(x, R.HIDDEN_STATE)
    assert hidden.shape == (1, 7, 16)
    torch.testing.assert_close(model.to_logits(hidden), model(x, R.LOGITS))


def test_padded_input_equals_prefix():
    # input shorter than the patch grid is padded internally; outputs of real bytes don't
    # depend on the padding
    model = tiny_model(stages=3)
    x = ids(1, model.max_seq_len)
    full = model(x, R.LOGITS)
    torch.testing.assert_close(model(x[:, :13], R.LOGITS), full[:, :13])


@pytest.mark.parametrize("block_type_", ["transformer", "mamba2"])
def test_checkpoint_chunks_give_the_same_loss_and_gradients(block_type_):
    torch.manual_seed(0)
    plain = MBLM(tiny_config(block_type_, stages=3)).train()
    chunked = MBLM(tiny_config(block_type_, stages=3, train_checkpoint_chunks=[2, 5])).train()
    chunked.load_state_dict(plain.state_dict())
    x = ids(2, plain.max_seq_len)
    a, b = plain(x), chunked(x)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_training_step_reduces_loss(block_type):
    torch.manual_seed(0)
    model = MBLM(tiny_config(block_type, stages=2)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = ids(4, model.max_seq_len)
    first = model(x)
    for _ in range(15):
        loss = model(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model(x).item() < first.item() - 0.5


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: torch.tensor([[1, 257]]),
            r"input_ids holds id 257, outside \[0, num_tokens=257\)",
        ),
        (lambda: torch.tensor([[-1, 2]]), r"input_ids holds id -1"),
        (lambda: torch.rand(1, 4), r"input_ids must hold integer ids, got dtype torch.float32"),
        (lambda: torch.zeros(1, 25, dtype=torch.long), r"length 25, longer than .* context"),
        (lambda: torch.zeros(4, dtype=torch.long), r"must have shape \(B, L\)"),
        (lambda: torch.zeros(1, 7, 4, dtype=torch.long), r"nested input_ids must have shape"),
        (lambda: torch.zeros(1, 6, 5, dtype=torch.long), r"nested input_ids must have shape"),
    ],
)
def test_bad_input_ids_are_value_errors(make, message):
    model = tiny_model(stages=2)  # seq_lens [6, 4]
    with pytest.raises(ValueError, match=message):
        model(make())


def test_bad_loss_mask_shape():
    model = tiny_model(stages=2)
    with pytest.raises(ValueError, match=r"loss_mask must have the shape of input_ids \(1, 5\)"):
        model(torch.zeros(1, 5, dtype=torch.long), loss_mask=torch.ones(1, 4))


# ---------------------------------------------------------------------------- generation


def test_generate_returns_prime_and_streams_every_byte(block_type):
    model = tiny_model(block_type, stages=2)
    prime = torch.tensor([72, 105])
    buf = io.BytesIO()
    with ByteStreamer(buf) as streamer:
        out = model.generate(prime, stream=streamer, num_tokens_to_generate=9)
    assert out.shape == (11,) and torch.equal(out[:2], prime)
    assert buf.getvalue() == bytes(out[2:].tolist())


def test_generate_greedy_matches_argmax_of_forward():
    model = tiny_model(stages=2)
    out = model.generate(torch.tensor([1, 2, 3]), num_tokens_to_generate=6, enable_progress=False)
    for i in range(3, 9):
        nxt = model(out[None, :i], R.LOGITS)[0, -1].argmax()
        assert out[i] == nxt
    # no prime: fills the context
    assert model.generate(enable_progress=False).shape == (model.max_seq_len,)


def test_generate_stops_at_end_token_and_rejects_overlong_requests():
    model = tiny_model(stages=2)
    first = model.generate(torch.tensor([5]), num_tokens_to_generate=1, enable_progress=False)
    stop = int(first[1])
    out = model.generate(
        torch.tensor([5]),
        num_tokens_to_generate=10,
        end_of_gen_token_id=stop,
        enable_progress=False,
    )
    assert out.tolist() == [5, stop]
    with pytest.raises(ValueError, match=r"cannot generate 30 bytes after a 1-byte prompt"):
        model.generate(torch.tensor([5]), num_tokens_to_generate=30)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(torch.tensor([5]), temperature=0)


def test_temperature_matters_when_sampling():
    model = tiny_model(stages=2)
    greedy = model.generate(num_tokens_to_generate=20, enable_progress=False)
    torch.manual_seed(1)
    hot = model.generate(num_tokens_to_generate=20, filter_thres=0.0, enable_progress=False)
    torch.manual_seed(1)
    cold = model.generate(
        num_tokens_to_generate=20, filter_thres=0.0, temperature=1e-7, enable_progress=False
    )
    assert torch.equal(cold, greedy)
    assert not torch.equal(hot, greedy)


# ---------------------------------------------------------------------------- compile


def test_explicit_attention_equals_sdpa():
    from mblm.model.transformer import explicit_causal_attention

    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(explicit_causal_attention(q, k, v, 0.0), want)


@pytest.mark.slow
def test_compiled_model_matches_eager_and_keeps_its_state_dict():
    eager = tiny_model("transformer", stages=2).train()
    compiled = tiny_model("transformer", stages=2).train()
    keys = list(compiled.state_dict())
    compiled.compile()
    assert list(compiled.state_dict()) == keys
    x = ids(2, eager.max_seq_len)
    a, b = eager(x), compiled(x)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="holds id 257"):
        compiled(torch.full((1, 3), 257))
