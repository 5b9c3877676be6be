"""Dropout on a CPU (charlm/dropout.py) drops what F.dropout drops: each value independently with
probability p, the kept ones scaled to keep the expectation, the gradient through the same mask; and the
model's training forward uses it where it applies."""

import pytest
import torch

from charlm import dropout as dropout_module
from charlm import recurrence
from charlm.dropout import dropout, keep_mask
from charlm.model import CharRNN, ModelConfig

N = 1 << 20  # values per draw: the binomial spread of a rate is below 0.0005 at p = 0.5


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_each_value_is_dropped_with_probability_p_wherever_it_lies_in_the_draw(p):
    """Every position of the four a 64-bit draw serves is dropped at p: a lane fed fewer random bits than
    the others (the draw's top bit is always 0) would drop at another rate, or never."""
    torch.manual_seed(1)
    keep, _ = keep_mask((N,), p)
    assert keep.dtype == torch.bool and keep.shape == (N,)
    dropped = (~keep).float()
    assert dropped.mean().item() == pytest.approx(p, abs=0.002)
    for lane in range(4):
        assert dropped[lane::4].mean().item() == pytest.approx(p, abs=0.004), lane


def test_neighbouring_values_are_dropped_independently():
    """Values drawn from the same 64-bit word (and from neighbouring words) are dropped together no more
    often than chance: p^2."""
    torch.manual_seed(2)
    p = 0.3
    dropped = (~keep_mask((N,), p)[0]).float()
    for gap in (1, 2, 3, 4, 5):
        both = (dropped[:-gap] * dropped[gap:]).mean().item()
        assert both == pytest.approx(p * p, abs=0.002), gap


def test_kept_values_are_scaled_so_the_expectation_is_unchanged_and_the_gradient_follows_the_mask():
    torch.manual_seed(3)
    x = torch.full((64, 128, 32), 2.0, requires_grad=True)
    y = dropout(x, 0.25)
    kept = y != 0
    assert torch.allclose(y[kept], torch.tensor(2.0 / 0.75))
    assert y.mean().item() == pytest.approx(2.0, abs=0.01)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    assert torch.allclose(x.grad, torch.where(kept, upstream / 0.75, torch.zeros(())), rtol=1e-6, atol=0)


def test_any_shape_gets_a_mask_of_its_own_size():
    """A count of values that is not a multiple of the four a draw serves (3 x 5 x 7 = 105)."""
    torch.manual_seed(4)
    x = torch.ones(3, 5, 7, requires_grad=True)
    y = dropout(x, 0.5)
    assert y.shape == (3, 5, 7)
    assert set(y.unique().tolist()) == {0.0, 2.0}
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


def test_it_is_the_identity_outside_training_or_at_zero_and_refuses_a_rate_outside_0_1():
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16)
    assert dropout(x, 0.1).dtype == torch.bfloat16
    assert dropout(x, 0.1, training=False) is x
    assert dropout(x, 0.0) is x
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            dropout(x, p)


@pytest.mark.parametrize("p", [1e-6, 1.0, 1 - 1e-6])
def test_rates_the_lanes_cannot_hold_are_dropped_by_pytorch(p, monkeypatch):
    """Within 1/65,536 of 0 or of 1 the lanes would drop nothing or everything: F.dropout draws instead."""
    calls = []
    real = torch.nn.functional.dropout
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    x = torch.ones(64, 1024)
    dropout(x, 0.1)
    assert calls == []  # an ordinary rate: the lane mask
    y = dropout(x, p)
    assert calls == [p]
    if p == 1.0:
        assert torch.equal(y, torch.zeros_like(x))
    with pytest.raises(ValueError, match="lane mask cannot hold"):
        keep_mask((8,), p)


def test_the_seed_decides_the_mask():
    """A run's seed, and the per-step seed a resumed run draws again, give the same masks."""
    x = torch.ones(8, 64, 48)
    torch.manual_seed(7)
    a = dropout(x, 0.2)
    torch.manual_seed(7)
    b = dropout(x, 0.2)
    torch.manual_seed(8)
    c = dropout(x, 0.2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_models_cpu_training_forward_drops_with_it_between_layers_and_before_the_decoder(monkeypatch):
    calls = []
    real = dropout_module.dropout

    def counted(x, p, training=True):
        calls.append((tuple(x.shape), p, training))
        return real(x, p, training)

    monkeypatch.setattr(recurrence, "dropout", counted)
    monkeypatch.setattr("charlm.model.dropout", counted)
    model = CharRNN(ModelConfig(vocab_size=9, cell="gru", hidden=12, layers=2, dropout=0.3))
    ids = torch.randint(0, 9, (2, 5))
    logits, _ = model(ids, model.init_state(2))
    assert calls == [((2, 5, 12), 0.3, True), ((2, 5, 12), 0.3, True)]  # between the layers, before the decoder
    model.eval()
    with torch.no_grad():
        first, _ = model(ids, model.init_state(2))
        again, _ = model(ids, model.init_state(2))
    assert torch.equal(first, again)  # nothing dropped in evaluation
