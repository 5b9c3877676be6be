"""The command line as users meet it: the README's promises, stdout holding only text, one-line errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY, invoke, run_cli


def test_hello_is_learned_and_greedy_sample_completes_it(runner, hello_file, tmp_path):
    out = tmp_path / "hello"
    result = invoke(runner, "train", hello_file, "--out", out, "--max-steps", "120", "--eval-every", "60",
                    "--hidden", "32", "--layers", "1", "--no-preview", "--lr", "1e-2")
    assert result.exit_code == 0, result.output
    sample = invoke(runner, "sample", "-c", out, "--prime", "hel", "--greedy", "--length", "9")
    assert sample.exit_code == 0
    assert sample.stdout.startswith("hello\nhello")
    assert sample.stderr == ""


def test_sample_stdout_holds_only_text(runner, trained_run):
    result = invoke(runner, "sample", "-c", trained_run, "--prime", "the ", "--length", "50", "--seed", "1")
    assert result.exit_code == 0
    assert result.stdout.startswith("the ") and len(result.stdout) == 4 + 50 + 1  # + final newline
    assert set(result.stdout) <= set(open(trained_run / "../words.txt").read()) | {"\n"}


def test_sample_seed_repeats_and_num_samples_batch(runner, trained_run):
    args = ("sample", "-c", trained_run, "--prime", "a", "-n", "30", "--seed", "5", "--num-samples", "3", "--json")
    first, second = invoke(runner, *args), invoke(runner, *args)
    samples = json.loads(first.stdout)["samples"]
    assert first.stdout == second.stdout and len(samples) == 3 and all(s.startswith("a") for s in samples)


def test_sample_defaults_to_newest_run(runner, trained_run, tmp_path, monkeypatch):
    """Two runs under ./checkpoints: sample and info use the one written last, whichever that is."""
    import os
    import shutil

    from charlm import checkpoint as ckpt

    monkeypatch.chdir(tmp_path)
    words, stuck = tmp_path / "checkpoints" / "words", tmp_path / "checkpoints" / "stuck"
    shutil.copytree(trained_run, words)
    stuck.mkdir()
    payload = torch.load(trained_run / "best.pt", weights_only=True)
    vocab = payload["vocab"]
    payload["model"]["decoder.weight"].zero_()  # a model that always says "z"
    payload["model"]["decoder.bias"].copy_(torch.tensor([10.0 if c == "z" else 0.0 for c in vocab]))
    ckpt.save(payload, stuck / "best.pt")
    for newest, oldest in ((words, stuck), (stuck, words)):
        for f in oldest.glob("*.pt"):
            os.utime(f, (1_000_000_000, 1_000_000_000))
        for f in newest.glob("*.pt"):
            os.utime(f, (2_000_000_000, 2_000_000_000))
        picked = invoke(runner, "sample", "--prime", "dog", "-n", "10", "--greedy")
        named = invoke(runner, "sample", "-c", newest, "--prime", "dog", "-n", "10", "--greedy")
        assert picked.exit_code == 0 and picked.stdout == named.stdout
        assert (picked.stdout == "dogzzzzzzzzzz\n") == (newest == stuck)
        info = json.loads(invoke(runner, "info", "--json").stdout)
        assert Path(info["checkpoint"]).parent.name == newest.name


def test_eval_json_and_info(runner, trained_run):
    corpus = trained_run.parent / "words.txt"
    result = invoke(runner, "eval", corpus, "-c", trained_run, "--json")
    report = json.loads(result.stdout)
    assert set(report) >= {"loss", "bpc", "perplexity", "chars"}
    assert report["bpc"] == pytest.approx(report["loss"] / math.log(2))
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["loss"] < 2.0 and report["chars"] == len(corpus.read_text()) - 1
    info = json.loads(invoke(runner, "info", trained_run, "--json").stdout)
    weights = torch.load(trained_run / "best.pt", weights_only=True)["model"]
    assert info["parameters"] == sum(t.numel() for t in weights.values())  # counted from the file itself
    v, h = info["vocab_size"], 48  # the fixture's 1 x 48 GRU, one-hot input: 3 gates, two biases, decoder
    assert info["model_config"]["hidden"] == h and info["model_config"]["cell"] == "gru"
    assert info["parameters"] == 3 * h * (v + h) + 2 * 3 * h + h * v + v
    assert sum(layer["parameters"] for layer in info["layers"]) == info["parameters"]
    assert info["step"] == 150 and info["vocab_size"] == len(set(corpus.read_text()))
    table = invoke(runner, "info", trained_run)
    assert "gru 0" in table.stdout and f"{info['parameters']:,}" in table.stdout.split("total")[1].splitlines()[0]


def test_korean_round_trips_through_train_sample_eval(runner, tmp_path):
    text = "안녕하세요 반갑습니다. 오늘 날씨가 좋네요.\n한국어 문장을 배웁니다.\n" * 120
    corpus = tmp_path / "korean.txt"
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "ko"
    trained = invoke(runner, "train", corpus, "--out", out, "--max-steps", "40", "--eval-every", "20", *TINY)
    assert trained.exit_code == 0, trained.output
    sample = invoke(runner, "sample", "-c", out, "--prime", "안녕", "-n", "20", "--seed", "1")
    assert sample.stdout.startswith("안녕") and set(sample.stdout) <= set(text)
    report = json.loads(invoke(runner, "eval", corpus, "-c", out, "--json").stdout)
    assert report["chars"] == len(text) - 1 and report["loss"] < math.log(len(set(text)))


def test_unknown_prime_characters_are_named(runner, trained_run):
    result = invoke(runner, "sample", "-c", trained_run, "--prime", "QZ the")
    assert result.exit_code != 0 and result.stdout == ""
    assert "Q Z" in result.stderr and "--unknown skip" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    skipped = invoke(runner, "sample", "-c", trained_run, "--prime", "QZ the", "--unknown", "skip", "-n", "5")
    assert skipped.exit_code == 0 and skipped.stdout.startswith(" the")


@pytest.mark.parametrize("args,message", [
    (["--temperature", "0"], "--temperature must be above 0"),
    (["--temperature", "-1"], "--temperature must be above 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--length", "0"], "--length must be at least 1"),
    (["--prime", ""], "the prime is empty"),
    (["--num-samples", "0"], "--num-samples must be at least 1"),
])
def test_bad_sample_options_get_one_line(runner, trained_run, args, message):
    result = invoke(runner, "sample", "-c", trained_run, *args)
    assert result.exit_code == 2 and message in result.stderr and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1


def test_top_k_beyond_vocabulary_is_clamped_and_said(runner, trained_run):
    result = invoke(runner, "sample", "-c", trained_run, "--top-k", "1000", "-n", "5", "--seed", "1")
    assert result.exit_code == 0 and "--top-k 1000" in result.stderr and len(result.stdout) == 6


def chart_marks(chart: str, mark: str) -> list:
    """(row, column) of every `mark` inside a terminal chart's plotting area (the part right of ' |')."""
    rows = [line.split(" |", 1)[1] for line in chart.splitlines() if " |" in line]
    return [(r, c) for r, row in enumerate(rows) for c, ch in enumerate(row) if ch == mark]


def test_plot_draws_a_falling_loss_descending(runner, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 100 * k, "train_loss": 3.0 - 0.5 * k, "val_loss": 3.2 - 0.5 * k} for k in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = invoke(runner, "plot", run)
    assert result.exit_code == 0
    labels = [line.split(" |")[0].strip() for line in result.stdout.splitlines() if " |" in line]
    assert [x for x in labels if x] == ["2.700", "0.500"]  # the axis spans the lowest train to the highest val
    for mark in "*o":  # train, val: five points each, left to right, each lower than the one before
        points = sorted(chart_marks(result.stdout, mark), key=lambda p: p[1])
        assert len(points) == 5, result.stdout
        assert all(a[0] < b[0] for a, b in zip(points, points[1:])), result.stdout


def test_plot_of_a_real_run_has_a_point_per_evaluation(runner, trained_run):
    result = invoke(runner, "plot", trained_run)
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert result.exit_code == 0
    steps = [r["step"] for r in records]
    assert len(set(steps)) == len(steps) >= 2  # evaluations at distinct steps, far apart on a 64-column axis
    val = sorted(chart_marks(result.stdout, "o"), key=lambda p: p[1])
    assert len(val) == len(records), result.stdout  # one val mark per evaluation, none lost
    order = sorted(range(len(records)), key=lambda i: records[i]["step"])
    by_loss = sorted(range(len(records)), key=lambda i: -records[i]["val_loss"])  # highest loss: the top row
    assert [val[order.index(i)][0] for i in by_loss] == sorted(p[0] for p in val), result.stdout


def test_plot_png_is_a_real_image(runner, trained_run, tmp_path):
    pytest.importorskip("matplotlib")
    import struct

    result = invoke(runner, "plot", trained_run, "-o", tmp_path / "curve.png")
    assert result.exit_code == 0, result.output
    data = (tmp_path / "curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (840, 480) and len(data) > 10_000  # 7 x 4 inches at 120 dpi, with curves drawn


def test_plot_png_without_matplotlib_says_how_to_get_it(runner, trained_run, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    result = invoke(runner, "plot", trained_run, "-o", tmp_path / "curve.png")
    assert result.exit_code == 1 and "pip install 'charlm[plot]'" in result.stderr
    assert not (tmp_path / "curve.png").exists()


def test_version_and_help_examples(runner):
    assert invoke(runner, "--version").stdout.startswith("charlm ")
    for command in ("train", "sample", "eval", "info", "plot"):
        help_text = invoke(runner, command, "--help").stdout
        assert "Example" in help_text


def test_train_help_states_the_defaults_training_uses():
    """The help writes the defaults out by hand (the CLI does not import torch for --help): each must be the
    value TrainConfig or ModelConfig trains with."""
    import re

    import typer

    from charlm.cli.app import app
    from charlm.model import ModelConfig
    from charlm.train import TrainConfig

    params = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    train, model = TrainConfig(), ModelConfig(vocab_size=2)
    for option, value in (("lr", train.lr), ("warmup", train.warmup_steps),
                          ("clip", train.clip), ("val_frac", train.val_frac), ("seed", train.seed),
                          ("optimizer", train.optimizer), ("cell", model.cell),
                          ("nonlinearity", model.nonlinearity)):
        stated = re.search(r"\[default: ([^\]]+)\]", params[option].help).group(1)
        assert (stated if isinstance(value, str) else float(stated)) == value, option
    # weight decay is sized with the model: the help names the values autosize chooses between
    from charlm.autosize import WEIGHT_DECAY_MANY, WEIGHT_DECAY_ONCE, WEIGHT_DECAY_REREAD

    stated = re.search(r"\[default: ([^\]]+)\]", params["weight_decay"].help).group(1)
    assert [float(x) for x in re.findall(r"\d+\.\d+", stated)] == [WEIGHT_DECAY_ONCE, WEIGHT_DECAY_REREAD,
                                                                     WEIGHT_DECAY_MANY]


def test_usage_errors_are_one_line_through_the_real_entry_point():
    result = run_cli("train", "x.txt", "--hidden", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--hidden" in result.stderr
