"""Resuming, fine-tuning and training longer: a resumed run keeps the options that shaped it (or refuses a
different one in one line), --init-from applies what its summary says, and a longer budget does not make
the learning rate jump."""

from __future__ import annotations

import hashlib
import math
import re

import pytest
import torch

from charlm import checkpoint as ckpt
from charlm import schedule
from charlm.corpus import decode_corpus, split_train_val
from charlm.model import CharRNN, ModelConfig
from charlm.train import TrainConfig, Trainer

from conftest import TINY, invoke, refused, word_text

FLAGS = [*TINY, "--no-items", "--eval-every", "10"]


def digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def split_counts(stderr: str) -> tuple:
    found = re.search(r"\(([\d,]+) train, ([\d,]+) validation\)", stderr)
    return found.group(1), found.group(2)


@pytest.fixture
def first_run(runner, words_file, tmp_path):
    """A run started with options that are not the defaults: another seed, validation share and optimizer."""
    out = tmp_path / "run"
    result = invoke(runner, "train", words_file, "--out", out, "--max-steps", "20", "--seed", "5", "--val-frac", "0.2",
                    "--optimizer", "adam", "--lr", "0.01", *FLAGS)
    assert result.exit_code == 0, result.stderr
    return out, result.stderr


@pytest.mark.parametrize("flag,value,named", [
    ("--optimizer", "adamw", "--optimizer adamw differs from --optimizer adam"),
    ("--seed", "6", "--seed 6 differs from --seed 5"),
    ("--val-frac", "0.1", "--val-frac 0.1 differs from --val-frac 0.2"),
    ("--lr", "0.003", "--lr 0.003 differs from --lr 0.01"),
    ("--hidden", "64", "--hidden 64 differs from --hidden 48"),
    ("--cell", "lstm", "--cell lstm differs from --cell gru"),
    ("--keep-crlf", None, "--keep-crlf differs from --no-keep-crlf"),
])
def test_resume_refuses_a_changed_option_in_one_line_and_changes_nothing(runner, words_file, first_run, flag, value,
                                                                         named):
    out, _ = first_run
    before = digest(out)
    given = [flag] if value is None else [flag, value]
    args = [a for a in FLAGS if a not in ("--hidden", "48")] if flag == "--hidden" else FLAGS
    line = refused(invoke(runner, "train", words_file, "--out", out, "--max-steps", "30", *given, *args, "--resume"),
                   named, "leave out " + flag)
    assert "drop --resume" in line
    assert digest(out) == before


def test_resume_without_the_options_keeps_the_runs_own_and_says_so(runner, words_file, first_run):
    out, first = first_run
    resumed = invoke(runner, "train", words_file, "--out", out, "--max-steps", "30", *FLAGS, "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    # the same split as the run's own (--val-frac 0.2), not the default 10%: no trained-on text validates
    assert split_counts(resumed.stderr) == split_counts(first)
    train, val = (int(n.replace(",", "")) for n in split_counts(first))
    assert val / (train + val) == pytest.approx(0.2, abs=0.01)
    flat = " ".join(resumed.stderr.split())  # the summary wraps its rows to the terminal
    kept = flat[flat.index("kept the run's own options"):flat.index("the rest at their defaults")]
    for option in ("--val-frac 0.2", "--seed 5", "--optimizer adam", "--lr 0.01"):
        assert option in kept
    saved = ckpt.load(out, prefer=ckpt.LAST)["train_config"]
    assert (saved["seed"], saved["val_frac"], saved["optimizer"], saved["lr"]) == (5, 0.2, "adam", 0.01)


def test_resume_giving_the_same_options_again_is_the_same_command_plus_resume(runner, words_file, first_run):
    out, _ = first_run
    again = invoke(runner, "train", words_file, "--out", out, "--max-steps", "30", "--seed", "5", "--val-frac", "0.2",
                   "--optimizer", "adam", "--lr", "0.01", *FLAGS, "--resume")
    assert again.exit_code == 0, again.stderr


def test_init_from_applies_the_dropout_its_summary_names(runner, words_file, first_run, tmp_path):
    out, _ = first_run
    tuned = tmp_path / "tuned"
    result = invoke(runner, "train", words_file, "--out", tuned, "--init-from", out, "--dropout", "0.3",
                    "--max-steps", "10", *FLAGS)
    assert result.exit_code == 0, result.stderr
    assert "dropout 0.3," in " ".join(result.stderr.split())  # the summary's model line...
    payload = ckpt.load(tuned, prefer=ckpt.LAST)
    assert payload["model_config"]["dropout"] == 0.3  # ...and the model that trained
    model = CharRNN(ModelConfig(**payload["model_config"]))
    assert model.config.dropout == 0.3


def test_init_from_refuses_another_architecture(runner, words_file, first_run, tmp_path):
    out, _ = first_run
    args = [a for a in FLAGS if a not in ("--hidden", "48")]
    refused(invoke(runner, "train", words_file, "--out", tmp_path / "tuned", "--init-from", out, "--hidden", "96",
                   "--max-steps", "10", *args), "--hidden 96 differs from the model", "leave out --hidden")
    assert not (tmp_path / "tuned").exists()


# ------------------------------------------------------------------------------------------ training longer
def _trainer(tmp_path, name, max_steps, resume=None, stop_at=None):
    corpus = decode_corpus(word_text(400).encode(), "t.txt")
    train_ids, val_ids = split_train_val(corpus.ids, 0.1)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, hidden=24, layers=1, dropout=0.0))
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    config = TrainConfig(batch_size=8, seq_len=16, max_steps=max_steps, eval_every=20, warmup_steps=10, lr=1e-2,
                         precision="fp32", full_final_eval=False)
    rates = {}
    holder = {}

    def callback(event, data):
        if event == "step":
            rates[data["step"] - 1] = data["lr"]  # the rate step data["step"] - 1 was taken with
            if stop_at and data["step"] == stop_at:
                holder["t"].request_stop("interrupt")

    trainer = Trainer(model, train_ids, val_ids, config, tmp_path / name, torch.device("cpu"), meta, callback=callback,
                      resume=resume)
    holder["t"] = trainer
    return trainer, rates


def test_training_longer_warms_up_from_where_the_rate_had_decayed_instead_of_jumping(tmp_path, one_thread):
    short, _ = _trainer(tmp_path, "run", 60)
    short.run()
    reached = schedule.cosine_rate(short.config, 60, 1.0)  # where the short run's schedule stood at its end
    assert reached == pytest.approx(1e-2 * 0.05, rel=0.05)  # the short run ended near the floor
    longer, rates = _trainer(tmp_path, "run", 120, resume=ckpt.load(tmp_path / "run", prefer=ckpt.LAST))
    assert longer.schedule.restart is not None and longer.schedule.restart.step == 60
    longer.run()
    unbroken_rate = lambda step: schedule.cosine_rate(longer.config, step, step / 120)  # noqa: E731
    # No jump: the first resumed step is within one warm-up increment of the rate reached, far below the
    # stretched curve's ~half of the peak...
    assert rates[60] < reached + (unbroken_rate(60) - reached) / 10 * 1.01
    assert unbroken_rate(60) > 5 * reached
    # ...it climbs steadily over the warm-up...
    assert all(rates[s] < rates[s + 1] for s in range(60, 69))
    # ...and from then on follows the unbroken longer run's curve.
    for step in range(70, 120):
        assert rates[step] == pytest.approx(unbroken_rate(step), rel=1e-9)
    # The checkpoint keeps the restart, so an interrupted extension resumes on the same curve.
    assert ckpt.load(tmp_path / "run", prefer=ckpt.LAST)["schedule_restart"] == {"step": 60, "lr": pytest.approx(reached)}


def test_resuming_an_interrupted_run_with_the_same_limits_keeps_its_schedule_exactly(tmp_path, one_thread):
    whole, whole_rates = _trainer(tmp_path, "whole", 80)
    whole.run()
    cut, cut_rates = _trainer(tmp_path, "cut", 80, stop_at=37)
    assert cut.run().stopped_by == "interrupt"
    rest, rest_rates = _trainer(tmp_path, "cut", 80, resume=ckpt.load(tmp_path / "cut", prefer=ckpt.LAST))
    assert rest.schedule.restart is None
    result = rest.run()
    assert result.step == 80
    for step in range(37, 80):
        assert rest_rates[step] == whole_rates[step]
    weights = zip(whole.model.state_dict().values(), rest.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)


def test_a_closer_limit_needs_no_warm_up():
    config = TrainConfig(max_steps=100, warmup_steps=10)
    closer = TrainConfig(max_steps=80, warmup_steps=10)
    pos = schedule.Position(step=50, epochs=0.5, elapsed=10.0)
    assert schedule.restart_for(config, closer, pos) is None
    assert schedule.restart_for(config, config, pos) is None
    longer = schedule.restart_for(config, TrainConfig(max_steps=200, warmup_steps=10), pos)
    assert longer.step == 50 and longer.lr == pytest.approx(schedule.cosine_rate(config, 50, 0.5))
    assert math.isfinite(longer.lr)
