"""The CPU GRU's written-out backward (charlm/recurrence.py) computes what PyTorch's nn.GRU computes; and a
training process keeps its freed memory (runtime.keep_freed_memory, the other half of the faster CPU step)."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from charlm import recurrence
from charlm.model import CharRNN, ModelConfig


def run(gru, x, h0, upstream, final_upstream, through_stack: bool):
    """(output, final state, every gradient) of one forward and backward, by nn.GRU or by gru_stack."""
    for p in gru.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    h0 = h0.detach().clone().requires_grad_(True)
    out, final = recurrence.gru_stack(gru, x, h0) if through_stack else gru(x, h0)
    ((out * upstream).sum() + (final * final_upstream).sum()).backward()
    return out.detach(), final.detach(), [x.grad, h0.grad] + [p.grad.clone() for p in gru.parameters()]


@pytest.mark.parametrize("layers,inputs,hidden,batch,steps", [(1, 5, 7, 3, 1), (2, 11, 16, 4, 9), (3, 8, 24, 2, 17)])
def test_outputs_states_and_every_gradient_match_pytorch_in_float32(layers, inputs, hidden, batch, steps):
    """Including the gradient into the initial state (a carried state that still has a graph) and the gradient
    arriving through the final state as well as through the outputs."""
    torch.manual_seed(layers)
    gru = torch.nn.GRU(inputs, hidden, num_layers=layers, batch_first=True)
    x, h0 = torch.randn(batch, steps, inputs), torch.randn(layers, batch, hidden) * 0.5
    upstream, final_upstream = torch.randn(batch, steps, hidden), torch.randn(layers, batch, hidden)
    theirs = run(gru, x, h0, upstream, final_upstream, through_stack=False)
    ours = run(gru, x, h0, upstream, final_upstream, through_stack=True)
    assert torch.allclose(ours[0], theirs[0], atol=1e-6)
    assert torch.allclose(ours[1], theirs[1], atol=1e-6)
    names = ["input", "initial state"] + [name for name, _ in gru.named_parameters()]
    for name, a, b in zip(names, ours[2], theirs[2]):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), name


def test_under_bf16_autocast_it_agrees_with_pytorch_to_bf16_rounding_and_keeps_the_state_in_float32():
    torch.manual_seed(0)
    gru = torch.nn.GRU(16, 32, num_layers=2, batch_first=True)
    x, h0 = torch.randn(4, 20, 16), torch.randn(2, 4, 32) * 0.5
    upstream, final_upstream = torch.randn(4, 20, 32), torch.randn(2, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = run(gru, x, h0, upstream, final_upstream, through_stack=False)
        ours = run(gru, x, h0, upstream, final_upstream, through_stack=True)
    assert ours[0].dtype == torch.bfloat16  # what the decoder computes in either way
    assert ours[1].dtype == theirs[1].dtype == torch.float32  # the carried state is not rounded to bf16
    assert (ours[0].float() - theirs[0].float()).abs().max().item() < 0.03
    assert (ours[1] - theirs[1]).abs().max().item() < 0.03
    for a, b in zip(ours[2], theirs[2]):  # every gradient reaches its tensor in that tensor's dtype
        assert a.dtype == b.dtype
        assert ((a - b).norm() / b.norm()).item() < 0.03


def test_dropout_between_layers_only_in_training_mode():
    torch.manual_seed(0)
    gru = torch.nn.GRU(6, 10, num_layers=2, batch_first=True, dropout=0.5)
    x, h0 = torch.randn(3, 7, 6), torch.zeros(2, 3, 10)
    gru.eval()
    with torch.no_grad():
        expected, _ = gru(x, h0)
    assert torch.allclose(recurrence.gru_stack(gru, x, h0)[0], expected, atol=1e-6)
    gru.train()
    assert not torch.allclose(recurrence.gru_stack(gru, x, h0)[0], expected, atol=1e-3)


def test_the_model_trains_through_it_on_a_cpu_and_only_there(monkeypatch):
    model = CharRNN(ModelConfig(vocab_size=9, cell="gru", hidden=12, layers=2, dropout=0.0))
    ids = torch.randint(0, 9, (2, 5))
    assert recurrence.usable(model.rnn, model.encode(ids))
    with torch.no_grad():  # evaluation and sampling keep PyTorch's fused loop
        assert not recurrence.usable(model.rnn, model.encode(ids))
    lstm = CharRNN(ModelConfig(vocab_size=9, cell="lstm", hidden=12, layers=2))
    assert not recurrence.usable(lstm.rnn, lstm.encode(ids))
    # the model's training forward goes through it (the real gru_stack, counted) and returns what PyTorch's
    # layer returns; the same forward without gradients does not
    calls = []
    real = recurrence.gru_stack
    monkeypatch.setattr(recurrence, "gru_stack", lambda *args: calls.append(1) or real(*args))
    logits, state = model(ids, model.init_state(2))
    assert len(calls) == 1 and logits.grad_fn is not None
    with torch.no_grad():
        expected, expected_state = model(ids, model.init_state(2))
    assert len(calls) == 1
    assert torch.allclose(logits.detach(), expected, atol=1e-5)
    assert torch.allclose(state.detach(), expected_state, atol=1e-6)
    assert state.dtype == torch.float32


def test_a_model_learns_the_same_through_it_as_through_pytorch(monkeypatch):
    """Twenty optimizer steps on the same batches from the same weights end at the same weights (fp32)."""
    def train(use_stack: bool):
        monkeypatch.setattr(recurrence, "usable", lambda gru, x: use_stack)
        torch.manual_seed(3)
        model = CharRNN(ModelConfig(vocab_size=7, cell="gru", hidden=16, layers=2, dropout=0.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        data = torch.randint(0, 7, (4, 41), generator=torch.Generator().manual_seed(5))
        state = model.init_state(4)
        for k in range(0, 40, 8):
            for _ in range(4):
                logits, new_state = model(data[:, k:k + 8], state)
                loss = F.cross_entropy(logits.reshape(-1, 7), data[:, k + 1:k + 9].reshape(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            state = new_state.detach()
        return loss.item(), [p.detach() for p in model.parameters()]

    loss_a, weights_a = train(True)
    loss_b, weights_b = train(False)
    assert loss_a == pytest.approx(loss_b, abs=1e-4)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(weights_a, weights_b))


def test_its_bf16_gradients_are_no_further_from_float32_than_pytorchs():
    """The backward pass runs in bf16: its gradients must be as close to the fp32 truth as PyTorch's own bf16
    layer's (on a 2 x 384 layer: relative errors 0.005-0.009 against PyTorch's 0.005-0.012)."""
    torch.manual_seed(0)
    gru = torch.nn.GRU(8, 48, num_layers=2, batch_first=True)
    with torch.no_grad():  # recurrent weights of a trained model's size, where a long memory matters
        for name, p in gru.named_parameters():
            if "weight_hh" in name:
                p.mul_(3)
    x, h0 = torch.randn(6, 40, 8), torch.randn(2, 6, 48) * 0.5
    upstream, final_upstream = torch.randn(6, 40, 48) * 0.01, torch.zeros(2, 6, 48)
    truth = run(gru, x, h0, upstream, final_upstream, through_stack=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = run(gru, x, h0, upstream, final_upstream, through_stack=False)
        ours = run(gru, x, h0, upstream, final_upstream, through_stack=True)

    def error(grads):
        return [((a.float() - b).norm() / b.norm()).item() for a, b in zip(grads, truth[2])]

    mine, pytorchs = error(ours[2]), error(theirs[2])
    assert max(mine) < 0.03
    assert sum(mine) <= 1.25 * sum(pytorchs), (mine, pytorchs)


FAULTS = """
import resource, sys, torch, torch.nn.functional as F
from charlm.model import CharRNN, ModelConfig
from charlm.runtime import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.set_num_threads(1)
model = CharRNN(ModelConfig(vocab_size=65, hidden=128, layers=2, embedding=32, dropout=0.1))
x = torch.randint(0, 65, (16, 64))
def step():
    logits, _ = model(x, model.init_state(16))
    F.cross_entropy(logits.reshape(-1, 65), x.reshape(-1)).backward()
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_a_training_process_keeps_its_freed_memory_instead_of_faulting_it_back_every_step():
    """A training step frees and re-asks for its activations: with glibc's defaults each step's pages came
    back from the kernel (several hundred to 1,500 page faults a step for this small model); kept, about none."""
    def faults(mode):
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        kept, per_step = done.stdout.split()
        return kept, float(per_step)

    kept, with_it = faults("keep")
    if kept != "True":
        pytest.skip("this C library has no mallopt (not glibc)")
    _, without = faults("plain")
    assert without > 200, without  # what the test guards against is there to see
    assert with_it < 0.25 * without, (with_it, without)
