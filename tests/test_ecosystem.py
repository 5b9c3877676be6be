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
    pytest.importorskip("safetensors", reason="safetensors folders need the hub extra: pip install 'charlm[hub]'")
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


# ------------------------------------------------------------------------------------------ TensorBoard
def events(run):
    """What TensorBoard shows for the run, {tag: [(step, value)]} (a float, or the text), and the hparams plugin's
    content: its one event directory read by TensorBoard's own reader (the one its plugins use, which applies
    a resumed writer's purge_step to every kind of data)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    found = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    found.Reload()
    out = {}
    for tag in found.Tags()["tensors"]:
        if tag.startswith("_hparams_/"):  # the HParams tab's entries: plugin content, no values
            continue
        values = [(e.step, tensor_util.make_ndarray(e.tensor_proto)) for e in found.Tensors(tag)]
        out[tag] = [(step, v.item() if v.dtype.kind == "f" else v.reshape(-1)[0].decode()) for step, v in values]
    return out, found.PluginTagToContent("hparams")


def tb_train(runner, corpus, out, *extra):
    pytest.importorskip("tensorboard", reason="--log tensorboard needs the extra: pip install 'charlm[tensorboard]'")
    args = [a for a in TINY if a != "--no-preview"]  # the previews go in as text
    result = invoke(runner, "train", corpus, "--out", out, "--eval-every", "20", "--no-items", "--log", "tensorboard",
                    *args, *extra)
    assert result.exit_code == 0, result.stderr
    return result


def test_tensorboard_shows_the_run(runner, tmp_path, one_thread):
    pytest.importorskip("tensorboard", reason="--log tensorboard needs the extra: pip install 'charlm[tensorboard]'")
    from tensorboard.plugins.hparams import plugin_data_pb2

    corpus = tmp_path / "words.txt"
    corpus.write_text(word_text(300), encoding="utf-8")
    run = tmp_path / "checkpoints" / "words"
    # periodic passes on a sample, so that the final report scores the whole tail whatever precision the CPU
    # picks (auto is fp32 without native bf16, and then a tail the sample already covers is not scored again)
    tb_train(runner, corpus, run, "--max-steps", "40", "--eval-chars", "512")
    assert [p.name for p in run.iterdir() if p.is_dir()] == ["tensorboard"]
    assert all(p.is_file() for p in (run / "tensorboard").iterdir())  # one run, no sub-runs for hparams
    found, hparams = events(run)
    for tag in ("train/loss", "train/grad_norm", "train/lr", "train/chars_per_s", "val/loss", "val/bpc",
                "time/eval_share", "val/final_loss", "preview/text_summary", "config/text_summary"):
        assert tag in found, tag
    records = metrics(run)  # the source of truth: the event files show the same evaluations
    assert [step for step, _ in found["val/loss"]] == [r["step"] for r in records] == [20, 40]
    assert [v for _, v in found["val/loss"]] == pytest.approx([r["val_loss"] for r in records], rel=1e-6)
    assert [v for _, v in found["val/bpc"]] == pytest.approx([r["bpc"] for r in records], rel=1e-6)
    train = [step for step, _ in found["train/loss"]]
    assert train == sorted(set(train)) and train[-1] == 40 and 0 < len(train) <= 40
    assert all(math.isfinite(v) and v > 0 for _, v in found["train/grad_norm"])
    assert all(0 < v < 1 for _, v in found["time/eval_share"])
    assert [step for step, _ in found["preview/text_summary"]] == [20, 40] and "T=0.5:" in found["preview/text_summary"][0][1]
    config = found["config/text_summary"][0][1]
    assert "| model/hidden | 48 |" in config and "| corpus/name | words.txt |" in config
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model/hidden"].number_value == 48 and start.hparams["train/batch_size"].number_value == 16
    # --force trains a new run in its place: the old run's curves go with its checkpoints
    tb_train(runner, corpus, run, "--max-steps", "20", "--force", "--lr", "1e-2")
    found, _ = events(run)
    assert [step for step, _ in found["val/loss"]] == [20] and max(s for s, _ in found["train/loss"]) == 20
    assert found["val/loss"][0][1] == pytest.approx(metrics(run)[0]["val_loss"], rel=1e-6)


def test_a_resumed_run_appends_without_a_duplicated_step(runner, tmp_path, one_thread):
    corpus = tmp_path / "words.txt"
    corpus.write_text(word_text(300), encoding="utf-8")
    run = tmp_path / "run"
    tb_train(runner, corpus, run, "--max-steps", "40")
    at_40 = (run / "last.pt").read_bytes()
    tb_train(runner, corpus, run, "--max-steps", "60", "--resume")
    # as after a crash at step 60 that lost the steps since the checkpoint at 40: they were logged already
    (run / "last.pt").write_bytes(at_40)
    tb_train(runner, corpus, run, "--max-steps", "60", "--resume")
    found, _ = events(run)
    for tag in ("train/loss", "train/grad_norm", "val/loss", "val/bpc", "preview/text_summary"):
        steps = [step for step, _ in found[tag]]
        assert steps == sorted(set(steps)), f"{tag}: a step twice or out of order: {steps}"
    assert [step for step, _ in found["val/loss"]] == [r["step"] for r in metrics(run)] == [20, 40, 60]
    assert [step for step, _ in found["preview/text_summary"]] == [20, 40, 60]
    assert max(step for step, _ in found["train/loss"]) == 60


def test_tensorboard_missing_is_one_line_before_anything_is_written(runner, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as where the package is not installed
    corpus = tmp_path / "words.txt"
    corpus.write_text(word_text(100), encoding="utf-8")
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", "--max-steps", "5", "--log", "tensorboard",
                    *TINY)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "pip install 'charlm[tensorboard]'" in result.stderr and not (tmp_path / "run").exists()
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", "--log", "wandb", *TINY)
    assert result.exit_code == 2 and "--log must be tensorboard" in result.stderr


def test_safetensors_missing_is_one_line_naming_the_extra(runner, trained_run, tmp_path, monkeypatch):
    import sys

    for name in ("safetensors", "safetensors.torch"):  # as where the package is not installed
        monkeypatch.setitem(sys.modules, name, None)
    result = invoke(runner, "export", trained_run, "-o", tmp_path / "shared", "--format", "safetensors")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "pip install 'charlm[hub]'" in result.stderr and not (tmp_path / "shared").exists()
