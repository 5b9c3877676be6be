"""`charlm export`: the one-step cell in a portable file gives CharRNN.step's logits, carries the state
through explicit inputs and outputs, and carries what a sampler needs in its metadata."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm.runs import load_model
from charlm.export import TOLERANCE, check, export_onnx, export_program, load_runner
from charlm.model import CharRNN, ModelConfig
from charlm.vocab import Vocabulary
from conftest import invoke

README = Path(__file__).resolve().parents[1] / "README.md"


def random_model(cell: str, vocab: Vocabulary, **config) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=vocab.size, cell=cell, hidden=24, layers=2, **config)).eval()


VOCAB = Vocabulary("\n abcdefghijklmnopqrstuvwxyz")


def test_export_check_on_the_command_line(runner, trained_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="--check runs the file in onnxruntime: pip install 'charlm[export]'")
    pytest.importorskip("onnx", reason="writing ONNX needs the export extra: pip install 'charlm[export]'")
    out = tmp_path / "model.onnx"
    result = invoke(runner, "export", trained_run, "-o", out, "--check")
    assert result.exit_code == 0, result.stderr
    diff = float(re.search(r"max abs logit difference ([0-9.e+-]+)", result.stderr).group(1))
    assert diff <= TOLERANCE
    # What a sampler elsewhere reads from the file alone.
    payload, model, vocab, _ = load_model(trained_run, "cpu")
    run, meta = load_runner(out)
    assert json.loads(meta["vocab"]) == vocab.chars
    assert json.loads(meta["model_config"]) == model.config.to_dict()
    assert json.loads(meta["state"]) == ["h"] and meta["default_context"] in vocab
    # Any batch size, and the state really is carried: a second step from the returned state.
    ids = torch.tensor([0, 3, 5, 7, 1])
    state = torch.randn(model.config.layers, 5, model.config.hidden)
    logits, h = run(ids.numpy(), state.numpy())
    logits2, _ = run(ids.numpy(), h)
    want, want_state = model.step(ids, state)
    want2, _ = model.step(ids, want_state)
    assert np.abs(logits - want.numpy()).max() <= TOLERANCE and np.abs(logits2 - want2.numpy()).max() <= TOLERANCE


@pytest.mark.parametrize("cell,config", [("rnn", {"embedding": 8, "nonlinearity": "relu"}), ("lstm", {}),
                                         ("lstm", {"tags": 2})])
def test_every_cell_exports_and_checks(cell, config, tmp_path):  # gru, one-hot: the trained run above
    pytest.importorskip("onnxruntime", reason="the check runs the file in onnxruntime")
    pytest.importorskip("onnx", reason="writing ONNX needs the onnx package")
    model = random_model(cell, VOCAB, **config)
    export_onnx(model, VOCAB, tmp_path / "m.onnx")
    assert check(tmp_path / "m.onnx", model, VOCAB, steps=200) <= TOLERANCE


def test_check_catches_a_file_that_disagrees(tmp_path):
    pytest.importorskip("onnxruntime", reason="the check runs the file in onnxruntime")
    pytest.importorskip("onnx", reason="writing ONNX needs the onnx package")
    model = random_model("gru", VOCAB)
    export_onnx(model, VOCAB, tmp_path / "m.onnx")
    other = random_model("gru", VOCAB)
    with torch.no_grad():
        other.rnn.weight_hh_l1.mul_(1.01)  # a 1% change deep in the recurrence
    assert check(tmp_path / "m.onnx", other, VOCAB, steps=20) > TOLERANCE


def test_torch_export_program_round_trip(tmp_path):
    model = random_model("lstm", VOCAB)  # the two-tensor state: the harder case
    export_program(model, VOCAB, tmp_path / "m.pt2")
    assert check(tmp_path / "m.pt2", model, VOCAB, steps=50) <= TOLERANCE
    _, meta = load_runner(tmp_path / "m.pt2")
    assert json.loads(meta["vocab"]) == VOCAB.chars


def test_unknown_format_is_refused(runner, trained_run, tmp_path):
    result = invoke(runner, "export", trained_run, "-o", tmp_path / "model.bin")
    assert result.exit_code == 2 and ".onnx" in result.stderr and not (tmp_path / "model.bin").exists()


def test_readme_sampler_needs_only_numpy_and_onnxruntime(runner, trained_run, tmp_path):
    pytest.importorskip("onnxruntime", reason="the README's sampler runs in onnxruntime")
    pytest.importorskip("onnx", reason="writing ONNX needs the onnx package")
    out = tmp_path / "model.onnx"
    assert invoke(runner, "export", trained_run, "-o", out).exit_code == 0
    section = README.read_text(encoding="utf-8").split("## Exporting", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"ROMEO:"' in code and '"model.onnx"' in code
    code = code.replace('"ROMEO:"', '"the "').replace('"model.onnx"', repr(str(out)))
    blocker = "import sys; sys.modules.update(charlm=None, torch=None)\n"  # importing either now fails
    result = subprocess.run([sys.executable, "-c", blocker + code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    vocab = load_model(trained_run, "cpu")[2]
    text = result.stdout.rstrip("\n")
    assert text.startswith("the ") and len(text) >= len("the ") + 200 and not vocab.unknown(text)
