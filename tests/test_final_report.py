"""The final report stays inside the run's budget: the whole validation text when that is cheap, else an even
sample with its standard error; --full-final-eval scores everything; the terminal says what it is doing."""

from __future__ import annotations

import io
import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from rich.console import Console

from charlm import checkpoint as ckpt
from charlm import train as train_module
from charlm.corpus import decode_corpus, split_train_val
from charlm.cli.display import TrainDisplay, final_line
from charlm.cli.train_report import end_summary
from charlm.evaluation import evaluate_text, standard_error
from charlm.model import CharRNN, ModelConfig
from charlm.train import TrainConfig, Trainer

from conftest import word_text


def test_standard_error_of_a_sample_of_rows():
    # two equal rows with mean losses 1 and 3: the sample standard deviation sqrt(2), over sqrt(2) rows
    assert standard_error(np.array([10.0, 30.0]), np.array([10, 10])) == pytest.approx(1.0)
    assert standard_error(np.array([5.0, 5.0, 5.0]), np.array([5, 5, 5])) == 0.0  # rows that agree
    assert standard_error(np.array([7.0]), np.array([3])) == 0.0  # one row: no spread to measure
    # twice the rows with the same spread: the error shrinks by sqrt(2)
    two = standard_error(np.array([1.0, 3.0]), np.array([1, 1]))
    four = standard_error(np.array([1.0, 3.0, 1.0, 3.0]), np.array([1, 1, 1, 1]))
    assert two == pytest.approx(1.0) and four == pytest.approx(math.sqrt(1 / 3))  # s^2 = 4/3 over 4 rows


def _run(tmp_path, name, events=None, **config):
    corpus = decode_corpus(word_text(3000, seed=3).encode(), "t.txt")
    train_ids, val_ids = split_train_val(corpus.ids, 0.3)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, hidden=24, layers=1, dropout=0.0))
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    conf = TrainConfig(**{"batch_size": 8, "seq_len": 16, "max_steps": 40, "eval_every": 20, "lr": 1e-2,
                          "precision": "fp32", "eval_chars": 2048, **config})
    callback = (lambda event, data: events.append((event, data))) if events is not None else None
    result = Trainer(model, train_ids, val_ids, conf, tmp_path / name, torch.device("cpu"), meta,
                     callback=callback).run()
    best = CharRNN(model.config)
    best.load_state_dict(ckpt.load(tmp_path / name / ckpt.BEST)["model"])
    return result, evaluate_text(best, val_ids, "cpu", streams=32, precision="fp32"), len(val_ids) - 1


def test_a_cheap_validation_text_is_scored_whole(tmp_path, one_thread):
    result, whole, pairs = _run(tmp_path, "cheap")  # ~15k characters: far inside 5 s
    assert result.full_val["chars"] == result.full_val["of"] == pairs
    assert result.full_val["se"] == 0.0
    assert result.full_val["loss"] == pytest.approx(whole["loss"], abs=1e-5)


def test_a_costly_one_is_sampled_evenly_with_its_standard_error(tmp_path, one_thread, monkeypatch):
    # A budget whose 5% (and floor) buys less than the periodic sample: as a 60 s run on 100 MB would be.
    monkeypatch.setattr(train_module, "FINAL_MIN_S", 0.0)
    monkeypatch.setattr(train_module, "FINAL_MIN_CHARS", 0)
    result, whole, pairs = _run(tmp_path, "costly", final_share=1e-9)
    report = result.full_val
    assert report["of"] == pairs and 2048 <= report["chars"] < pairs
    assert report["se"] > 0
    # the estimate and its error bar describe the whole text: the full pass lies within 4 standard errors
    assert abs(report["loss"] - whole["loss"]) < 4 * report["se"]


def test_full_final_eval_scores_all_whatever_it_costs(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(train_module, "FINAL_MIN_S", 0.0)
    monkeypatch.setattr(train_module, "FINAL_MIN_CHARS", 0)
    result, whole, pairs = _run(tmp_path, "full", final_share=1e-9, full_final_eval=True)
    assert result.full_val["chars"] == pairs
    assert result.full_val["loss"] == pytest.approx(whole["loss"], abs=1e-5)


def test_the_final_pass_announces_itself_and_reports_progress(tmp_path, one_thread, monkeypatch):
    monkeypatch.setattr(train_module, "FINAL_MIN_S", 0.0)
    monkeypatch.setattr(train_module, "FINAL_MIN_CHARS", 0)
    events = []
    result, _, pairs = _run(tmp_path, "shown", events=events, final_share=1e-9)
    names = [e for e, _ in events]
    start = names.index("final_start")
    assert names[-1] == "final" and start < names.index("final_progress") < len(names) - 1
    progress = [d for e, d in events if e == "final_progress"]
    assert progress[-1]["done"] == progress[-1]["total"] >= 1
    # rendered for a pipe: one permanent line that says what is being scored
    out = io.StringIO()
    display = TrainDisplay(Console(file=out, width=100, force_terminal=False))
    display("final_start", events[start][1])
    line = out.getvalue().rstrip("\n")
    assert "\n" not in line and len(line) <= 100
    assert line.startswith("final report:") and "an even sample of" in line and "in float32" in line


def test_eval_max_chars_scores_an_even_sample_with_its_standard_error(runner, trained_run, tmp_path, monkeypatch):
    import json

    from charlm.cli import display
    from conftest import invoke

    text = tmp_path / "held_out.txt"
    text.write_text(word_text(2000, seed=11), encoding="utf-8")
    whole = json.loads(invoke(runner, "eval", text, "-c", trained_run, "--json").stdout)
    assert "se" not in whole and whole["chars"] == len(text.read_text()) - 1
    monkeypatch.setattr(display, "ANNOUNCE_CHARS", 1000)  # as a pass over a large file would
    result = invoke(runner, "eval", text, "-c", trained_run, "--json", "--max-chars", "6000")
    assert result.exit_code == 0, result.stderr
    sample = json.loads(result.stdout)
    assert sample["chars"] == 6000 and sample["of"] == whole["chars"] and sample["se"] > 0
    assert abs(sample["loss"] - whole["loss"]) < 4 * sample["se"]
    assert "scoring an even sample: 6,000 characters" in result.stderr  # the line a piped pass prints
    table = invoke(runner, "eval", text, "-c", trained_run, "--max-chars", "6000")
    assert f"of {whole['chars']:,} (an even sample)" in table.stdout and "±" in table.stdout
    bad = invoke(runner, "eval", text, "-c", trained_run, "--max-chars", "0")
    assert bad.exit_code != 0 and "--max-chars must be at least 1" in bad.stderr and "Traceback" not in bad.stderr


def test_the_time_a_run_reports_holds_its_evaluations(tmp_path, one_thread):
    # One step, then the evaluation that ends the run: the report's "after X, Y% of it evaluating and saving"
    # once read 451% when that evaluation was counted in Y but not in X.
    result, _, _ = _run(tmp_path, "one", max_steps=1)
    assert result.step == 1 and result.eval_s > 0
    assert result.eval_s <= result.elapsed_s


def _sample_favours_step_20(monkeypatch):
    """The periodic sample reads step 20's model 5 nats/char lower than it is: a sample's noise, writ large."""
    validate = Trainer._validate

    def noisy(self):
        val, scored = validate(self)
        return (val - 5.0 if self.step == 20 else val), scored

    monkeypatch.setattr(Trainer, "_validate", noisy)


def test_the_last_weights_are_kept_when_the_whole_text_prefers_them(tmp_path, one_thread, monkeypatch):
    # A periodic sample picks its best with its own noise: here it calls step 20 best by a wide margin, while the
    # run (still improving) is better at step 40. The final pass scores both on the same characters; best.pt
    # ends up holding what scores lower there, and says which step that was.
    _sample_favours_step_20(monkeypatch)
    events = []
    result, whole, pairs = _run(tmp_path, "noisy", events)  # _run scores best.pt on the whole text
    report = result.full_val
    assert result.best_step == report["step"] == 40 and report["chars"] == pairs
    assert report["compared"]["step"] == 20 and report["compared"]["loss"] > report["loss"]
    assert whole["loss"] == pytest.approx(report["loss"], abs=1e-5)  # best.pt is the model reported
    # best.pt, last.pt and metrics.jsonl agree on it, as a resumed run reads them
    for name in (ckpt.BEST, ckpt.LAST):
        saved = ckpt.load(tmp_path / "noisy" / name)
        assert saved["step"] == saved["best_step"] == 40 and saved["bad_evals"] == 0
        assert saved["best_val_loss"] == result.best_val_loss == result.metrics[-1]["val_loss"]
    records = [json.loads(line) for line in (tmp_path / "noisy" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["best"]][-1] == 40
    start = next(data for event, data in events if event == "final_start")
    assert (start["step"], start["last"]) == (20, 40)
    # and the report names it
    out = io.StringIO()
    monkeypatch.setattr(sys, "argv", ["charlm", "train", "t.txt", "--max-steps", "40"])
    end_summary(Console(file=out, width=200), result, tmp_path / "noisy", SimpleNamespace(patience=3), [])
    assert "(step 40)" in out.getvalue()
    assert f"best.pt: the last step's weights: {report['loss']:.4f} on the same characters against " \
           f"{report['compared']['loss']:.4f} for step 20" in out.getvalue()


def test_the_sample_best_stays_when_the_whole_text_agrees(tmp_path, one_thread, monkeypatch):
    # The other way round: the last weights are worse (their decoder's bias thrown off before the last
    # evaluation): the final pass scores both and best.pt keeps step 20.
    validate = Trainer._validate

    def thrown_off(self):
        if self.step == 40:
            noise = torch.randn(self.model.decoder.bias.shape, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                self.model.decoder.bias.add_(3 * noise)
        return validate(self)

    monkeypatch.setattr(Trainer, "_validate", thrown_off)
    result, whole, pairs = _run(tmp_path, "agrees")
    report = result.full_val
    assert result.best_step == report["step"] == 20
    assert report["compared"]["step"] == 40 and report["compared"]["loss"] > report["loss"] + 0.5
    assert whole["loss"] == pytest.approx(report["loss"], abs=1e-5)
    assert ckpt.load(tmp_path / "agrees" / ckpt.BEST)["step"] == 20


def test_the_final_line_names_both_steps():
    assert "(step 619 and the last, 824)" in final_line({"chars": 10, "of": 10, "step": 619, "last": 824})
    assert "(step 619)" in final_line({"chars": 10, "of": 10, "step": 619, "last": None})


def test_no_second_pass_when_the_whole_text_does_not_fit_twice(tmp_path, one_thread, monkeypatch):
    # A large text in a short budget: the report reads a sample, and the last weights are not scored beside
    # the best (the end of a run stays inside its budget); the sample's best stands.
    monkeypatch.setattr(train_module, "FINAL_MIN_S", 0.0)
    monkeypatch.setattr(train_module, "FINAL_MIN_CHARS", 0)
    _sample_favours_step_20(monkeypatch)
    events = []
    result, _, pairs = _run(tmp_path, "short", events, final_share=1e-9)
    assert result.best_step == result.full_val["step"] == 20 and "compared" not in result.full_val
    assert result.full_val["chars"] < pairs
    start = next(data for event, data in events if event == "final_start")
    assert start["last"] is None
