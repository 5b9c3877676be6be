"""Fitting what PyTorch users already use (issue 24): the gradient norm in metrics.jsonl, weights shared as a
safetensors folder any command loads, and TensorBoard event files beside a run's checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from charlm import checkpoint as ckpt
from conftest import TINY, invoke, word_text


def metrics(run) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_metrics_report_the_gradient_norm_before_clipping(runner, tmp_path, one_thread):
    corpus = tmp_path / "words.txt"
    corpus.write_text(word_text(300), encoding="utf-8")
    clip = 1e-3  # far below any real gradient's norm: the clipped norm would be exactly this
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", "--max-steps", "30", "--eval-every", "10",
                    "--no-items", "--clip", str(clip), *TINY)
    assert result.exit_code == 0, result.stderr
    norms = [r["grad_norm"] for r in metrics(tmp_path / "run")]
    assert len(norms) == 3 and all(math.isfinite(n) and n > 0 for n in norms)
    assert all(n > 20 * clip for n in norms)  # the norm clip_grad_norm_ measured, not the one it left
    assert len(set(norms)) == 3  # each evaluation's own latest step, not one value repeated


# ------------------------------------------------------------------------------------------ safetensors
def export_folder(runner, run, out, *extra):
    pytest.importorskip("safetensors", reason="safetensors folders need the hub extra: pip install 'charlm[hub]'")
    result = invoke(runner, "export", run, "-o", out, "--format", "safetensors", *extra)
    assert result.exit_code == 0, result.stderr
    return result


def test_folder_weights_round_trip_bit_for_bit(runner, trained_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "words-gru"
    result = export_folder(runner, trained_run, out, "--check")
    assert "identical" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    saved = torch.load(trained_run / "best.pt", weights_only=True)
    tensors = load_file(out / "model.safetensors")  # what any other tool reads, charlm not involved
    assert tensors.keys() == saved["model"].keys()
    for name, value in saved["model"].items():
        assert tensors[name].dtype == value.dtype and torch.equal(tensors[name], value), name
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "charlm" and config["vocab"] == saved["vocab"]
    assert config["model_config"] == saved["model_config"] and config["corpus"] == saved["corpus"]
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "words.txt" in card and f"{saved['best_val_loss']:.4f}" in card and f"{saved['corpus']['chars']:,}" in card
    assert "charlm train" in card and "--format safetensors" in card  # how it was made
    # charlm's own loader gives the same tensors and the same model description
    folder = ckpt.load(out)
    assert all(torch.equal(folder["model"][k], v) for k, v in saved["model"].items())
    info = invoke(runner, "info", out, "--json")
    assert info.exit_code == 0, info.stderr
    assert json.loads(info.stdout)["parameters"] == sum(v.numel() for v in saved["model"].values())


def test_sample_and_eval_from_the_folder_equal_the_run(runner, trained_run, tmp_path):
    out = tmp_path / "shared"
    export_folder(runner, trained_run, out)
    args = ["--prime", "the ", "-n", "120", "--seed", "7"]
    from_run = invoke(runner, "sample", "-c", trained_run, *args)
    from_folder = invoke(runner, "sample", "-c", out, *args)
    assert from_run.exit_code == 0 and from_folder.exit_code == 0, from_folder.stderr
    assert from_folder.stdout == from_run.stdout and len(from_run.stdout) > 120
    text = tmp_path / "held.txt"
    text.write_text(word_text(40, seed=5), encoding="utf-8")
    run_eval = invoke(runner, "eval", "-c", trained_run, text, "--json")
    folder_eval = invoke(runner, "eval", "-c", out, text, "--json")
    assert folder_eval.exit_code == 0, folder_eval.stderr
    assert json.loads(folder_eval.stdout)["loss"] == json.loads(run_eval.stdout)["loss"]


def test_a_damaged_folder_is_refused_in_one_line(runner, trained_run, tmp_path):
    out = tmp_path / "shared"
    export_folder(runner, trained_run, out)
    pristine = {p.name: p.read_bytes() for p in out.iterdir()}

    def refused(what: str):
        result = invoke(runner, "sample", "-c", out, "-n", "5")
        assert result.exit_code == 1 and result.stdout == "", what
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.stderr, what
        for name, data in pristine.items():
            (out / name).write_bytes(data)
        return lines[0]

    weights = out / "model.safetensors"
    weights.write_bytes(pristine["model.safetensors"][:-100])  # truncated
    assert "model.safetensors" in refused("truncated")
    data = bytearray(pristine["model.safetensors"])
    data[-8] ^= 0x40  # one flipped bit in a weight: safetensors itself cannot tell
    weights.write_bytes(bytes(data))
    assert "SHA-256" in refused("flipped bit")
    weights.unlink()
    assert "no model.safetensors" in refused("weights missing")
    (out / "config.json").unlink()
    assert "no config.json" in refused("config missing")
    (out / "config.json").write_text("{ not json", encoding="utf-8")
    assert "config.json" in refused("not JSON")
    config = json.loads(pristine["config.json"])
    config["model_config"]["hidden"] += 1  # a config from another model beside these weights
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert "does not match" in refused("mixed from two exports")
    config = json.loads(pristine["config.json"])
    config["vocab"] = config["vocab"][:-1]
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    assert "vocab" in refused("short vocabulary")
    assert invoke(runner, "sample", "-c", out, "-n", "5").exit_code == 0  # restored: loads again


def test_folder_loads_without_running_code(runner, trained_run, tmp_path):
    """A weights file that is a pickle, renamed: safetensors reads a JSON header, never unpickles."""
    out = tmp_path / "shared"
    export_folder(runner, trained_run, out)
    marker = tmp_path / "ran"
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (out / "model.safetensors").write_bytes(pickle.dumps(Payload()))
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    del config["weights_sha256"]  # past the checksum: the reader itself must refuse it
    (out / "config.json").write_text(json.dumps(config), encoding="utf-8")
    result = invoke(runner, "info", out)
    assert result.exit_code == 1 and "not a readable safetensors file" in result.stderr and not marker.exists()


def test_export_to_a_file_name_with_format_safetensors_is_refused(runner, trained_run, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors folders need the hub extra")
    result = invoke(runner, "export", trained_run, "-o", tmp_path / "model.onnx", "--format", "safetensors")
    assert result.exit_code == 2 and "folder" in result.stderr and not (tmp_path / "model.onnx").exists()
