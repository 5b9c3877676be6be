"""The command line as users meet it: the README's promises, stdout holding only text, one-line errors."""

import json
import math

import pytest

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


def test_sample_defaults_to_newest_run(runner, trained_run, monkeypatch):
    monkeypatch.chdir(trained_run.parent.parent)
    (trained_run.parent.parent / "checkpoints").mkdir(exist_ok=True)
    link = trained_run.parent.parent / "checkpoints" / "words"
    if not link.exists():
        link.symlink_to(trained_run)
    result = invoke(runner, "sample", "--prime", "dog", "-n", "10")
    assert result.exit_code == 0 and result.stdout.startswith("dog")


def test_eval_json_and_info(runner, trained_run):
    corpus = trained_run.parent / "words.txt"
    result = invoke(runner, "eval", corpus, "-c", trained_run, "--json")
    report = json.loads(result.stdout)
    assert set(report) >= {"loss", "bpc", "perplexity", "chars"}
    assert report["bpc"] == pytest.approx(report["loss"] / math.log(2))
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))
    assert report["loss"] < 2.0 and report["chars"] == len(corpus.read_text()) - 1
    info = json.loads(invoke(runner, "info", trained_run, "--json").stdout)
    assert info["parameters"] == sum(layer["parameters"] for layer in info["layers"])
    assert info["step"] == 150 and info["vocab_size"] == len(set(corpus.read_text()))
    table = invoke(runner, "info", trained_run)
    assert "gru 0" in table.stdout and "total" in table.stdout


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


def test_plot_draws_in_terminal(runner, trained_run):
    result = invoke(runner, "plot", trained_run)
    assert result.exit_code == 0 and "train" in result.stdout and "val" in result.stdout


def test_plot_png_needs_matplotlib_or_writes_file(runner, trained_run, tmp_path):
    result = invoke(runner, "plot", trained_run, "-o", tmp_path / "curve.png")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert result.exit_code == 1 and "pip install 'charlm[plot]'" in result.stderr
    else:
        assert result.exit_code == 0 and (tmp_path / "curve.png").stat().st_size > 1000


def test_version_and_help_examples(runner):
    assert invoke(runner, "--version").stdout.startswith("charlm ")
    for command in ("train", "sample", "eval", "info", "plot"):
        help_text = invoke(runner, command, "--help").stdout
        assert "Example" in help_text


def test_usage_errors_are_one_line_through_the_real_entry_point():
    result = run_cli("train", "x.txt", "--hidden", "abc")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--hidden" in result.stderr
