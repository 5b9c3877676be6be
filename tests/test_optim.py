"""charlm's AdamW (charlm/optim.py) against torch's: the same trajectory, interchangeable saved state, and a
training run that never imports torch's compiler stack (the reason it exists)."""

import os
import subprocess
import sys

import pytest
import torch

from charlm.optim import AdamW


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(20, 8), torch.nn.GRU(8, 16, num_layers=2, batch_first=True))


def _groups(model):
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _train(model, opt, steps, seed=1, lrs=None):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        if lrs:
            for group in opt.param_groups:
                group["lr"] = lrs[i]
        x = torch.randint(0, 20, (4, 12), generator=gen)
        out, _ = model[1](model[0](x))
        loss = (out ** 2).mean() - out[..., 0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("decay", [0.0, 0.1])
def test_same_trajectory_as_torch_adamw(decay):
    ours_model, torch_model = _model(), _model()
    lrs = [3e-3 * (1 - i / 40) for i in range(40)]  # a schedule, set through param_groups as the Trainer does
    groups = lambda m: [{**g, "weight_decay": decay if g["weight_decay"] else 0.0} for g in _groups(m)]  # noqa
    _train(ours_model, AdamW(groups(ours_model), lr=3e-3, betas=(0.9, 0.99)), 40, lrs=lrs)
    _train(torch_model, torch.optim.AdamW(groups(torch_model), lr=3e-3, betas=(0.9, 0.99)), 40, lrs=lrs)
    moved = 0.0
    for a, b, start in zip(ours_model.parameters(), torch_model.parameters(), _model().parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-2  # the models trained, so agreeing means something


def test_saved_state_moves_between_torch_and_charlm():
    """A checkpoint written with torch's AdamW (charlm before its own) resumes under charlm's, and back."""
    reference, resumed = _model(), _model()
    ref_opt = torch.optim.AdamW(_groups(reference), lr=2e-3, betas=(0.9, 0.99))
    _train(reference, ref_opt, 10)
    resumed.load_state_dict(reference.state_dict())
    ours = AdamW(_groups(resumed), lr=2e-3, betas=(0.9, 0.99))
    ours.load_state_dict(ref_opt.state_dict())
    _train(reference, ref_opt, 10, seed=2)
    _train(resumed, ours, 10, seed=2)
    for a, b in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    back = torch.optim.AdamW(_groups(reference), lr=2e-3, betas=(0.9, 0.99))
    back.load_state_dict(ours.state_dict())
    assert [float(s["step"]) for s in back.state.values()] == [20.0] * len(list(reference.parameters()))


def test_training_never_imports_the_compiler(tmp_path):
    """torch.optim's optimizers import torch._dynamo (seconds of start-up); a charlm run must not."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    code = ("import sys\nfrom charlm.cli import main\nsys.argv = ['charlm', 'train', sys.argv[1], '--out', sys.argv[2], "
            "'--max-steps', '3', '--hidden', '16', '--layers', '1', '--batch-size', '4', '--seq-len', '16', "
            "'--no-preview', '--no-items']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print('dynamo' if 'torch._dynamo' in sys.modules else 'clean')\n")
    out = subprocess.run([sys.executable, "-c", code, str(corpus), str(tmp_path / "run")], capture_output=True,
                         text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "clean"


def test_a_parameter_that_misses_steps_keeps_its_own_count_as_torch_does():
    """Bias correction uses each parameter's own step count: one without a gradient on some steps lags."""
    results = []
    for make in (AdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
        opt = make([a, b], lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
        for i in range(12):
            opt.zero_grad(set_to_none=True)
            loss = (a ** 2).sum() + ((b - 1) ** 2).sum() * (i % 3 == 0)  # b has a gradient on every third step
            loss.backward()
            if i % 3:
                b.grad = None
            opt.step()
        results.append((a.detach().clone(), b.detach().clone()))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
