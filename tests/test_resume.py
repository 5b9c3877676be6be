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


# ------------------------------------------------------------------------------------------ ending early, cooled
def _stalling(tmp_path, name, resume=None, stop_at=None, patience=2):
    """A run whose validation loss can only get worse after its first steps: it trains on words and is scored on
    one letter repeated, which the words teach it to expect less and less."""
    corpus = decode_corpus((word_text(300) + "z" * 4000).encode(), "t.txt")
    ids = corpus.ids
    train_ids, val_ids = ids[:-4000], ids[-4000:]
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, hidden=24, layers=1, dropout=0.0))
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    config = TrainConfig(batch_size=8, seq_len=16, max_steps=400, eval_every=5, warmup_steps=5, lr=1e-2,
                         precision="fp32", full_final_eval=False, patience=patience)
    seen = {"rates": {}, "cooldown": None, "best_at_cooldown": None}
    holder = {}

    def callback(event, data):
        if event == "step":
            seen["rates"][data["step"] - 1] = data["lr"]
            if stop_at and data["step"] == stop_at:
                holder["t"].request_stop("interrupt")
        elif event == "cooldown":
            seen["cooldown"] = data
            best = ckpt.load(tmp_path / name / ckpt.BEST)
            now = holder["t"]
            same_weights = all(torch.equal(best["model"][k], v) for k, v in now.model.state_dict().items())
            state, saved = now.optimizer.state_dict()["state"], best["optimizer"]["state"]
            same_moments = bool(state) and all(torch.equal(torch.as_tensor(saved[k][n]), torch.as_tensor(v))
                                               for k, group in state.items() for n, v in group.items())
            seen["best_at_cooldown"] = same_weights and same_moments

    trainer = Trainer(model, train_ids, val_ids, config, tmp_path / name, torch.device("cpu"), meta, callback=callback,
                      resume=resume)
    holder["t"] = trainer
    return trainer, seen


def test_a_run_that_stops_improving_goes_back_to_its_best_cools_down_and_ends(tmp_path, one_thread):
    trainer, seen = _stalling(tmp_path, "run")
    result = trainer.run()
    cooled = result.cooldown
    assert result.stopped_by == "patience" and cooled is not None
    # patience 2 at one evaluation every 5 steps: the cooldown began 10 steps after the best...
    assert cooled.step == seen["cooldown"]["best_step"] + 10
    # ...from the best's own weights and optimizer moments (best.pt), not the worse ones the run had reached
    assert seen["best_at_cooldown"] is True
    # the rate falls from the best's rate to the floor over the cooldown, then the run ends, long before its limit
    rates = seen["rates"]
    best_lr = next(m["lr"] for m in result.metrics if m["step"] == seen["cooldown"]["best_step"])
    assert rates[cooled.step] == pytest.approx(best_lr)
    assert all(rates[s] > rates[s + 1] for s in range(cooled.step, cooled.end() - 1))
    assert rates[cooled.end() - 1] < best_lr / 3
    assert result.step == cooled.end() < 400
    assert cooled.steps == max(schedule.COOLDOWN_MIN, round(schedule.COOLDOWN_SHARE * seen["cooldown"]["best_step"]))
    # the checkpoint says where the run cooled, so a resume knows it has ended
    assert ckpt.load(tmp_path / "run", prefer=ckpt.LAST)["schedule_cooldown"] == cooled.to_dict()


def test_an_interrupted_cooldown_resumes_exactly(tmp_path, one_thread):
    whole, whole_seen = _stalling(tmp_path, "whole")
    result = whole.run()
    middle = result.cooldown.step + result.cooldown.steps // 2
    cut, _ = _stalling(tmp_path, "cut", stop_at=middle)
    assert cut.run().stopped_by == "interrupt"
    rest, rest_seen = _stalling(tmp_path, "cut", resume=ckpt.load(tmp_path / "cut", prefer=ckpt.LAST))
    assert rest.schedule.cooldown == result.cooldown
    again = rest.run()
    assert (again.step, again.stopped_by, again.best_step) == (result.step, "patience", result.best_step)
    for step in range(middle, result.step):
        assert rest_seen["rates"][step] == whole_seen["rates"][step]
    weights = zip(whole.model.state_dict().values(), rest.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)


def test_a_stall_found_after_a_resume_goes_back_to_the_best_in_best_pt(tmp_path, one_thread):
    whole, _ = _stalling(tmp_path, "whole")
    result = whole.run()
    cut, _ = _stalling(tmp_path, "cut", stop_at=result.cooldown.step - 2)  # the best is on disk, not in memory
    assert cut.run().stopped_by == "interrupt"
    rest, seen = _stalling(tmp_path, "cut", resume=ckpt.load(tmp_path / "cut", prefer=ckpt.LAST))
    again = rest.run()
    assert seen["best_at_cooldown"] is True and again.cooldown == result.cooldown
    weights = zip(whole.model.state_dict().values(), rest.model.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)


def test_a_run_that_ended_cooled_stays_ended_unless_patience_zero_trains_on(tmp_path, one_thread):
    first, _ = _stalling(tmp_path, "run")
    ended = first.run()
    again, _ = _stalling(tmp_path, "run", resume=ckpt.load(tmp_path / "run", prefer=ckpt.LAST))
    result = again.run()
    assert (result.step, result.stopped_by, result.best_step) == (ended.step, "patience", ended.best_step)
    on, seen = _stalling(tmp_path, "run", resume=ckpt.load(tmp_path / "run", prefer=ckpt.LAST), patience=0)
    assert on.schedule.cooldown is None and on.schedule.restart.step == ended.step
    result = on.run()
    assert result.stopped_by == "max_steps" and result.step == 400
    # no jump from the cooled rate: it climbs back to the curve over the warm-up, as when training longer
    rates = seen["rates"]
    floor = on.config.lr * on.config.min_lr_frac
    assert rates[ended.step] < floor + (rates[ended.step + 5] - floor) / 4
    assert all(rates[s] < rates[s + 1] for s in range(ended.step, ended.step + 4))


def test_patience_zero_never_ends_early(tmp_path, one_thread):
    trainer, seen = _stalling(tmp_path, "run", patience=0)
    result = trainer.run()
    assert result.stopped_by == "max_steps" and result.step == 400 and result.cooldown is None


def test_the_cooldown_rate_and_its_end():
    config = TrainConfig(max_time=600, lr=5e-3, min_lr_frac=0.05, warmup_steps=50)
    plan = schedule.Schedule(config, cooldown=schedule.cooldown_for(300, best_step=200, best_lr=4e-3))
    end = 400  # half the 200 steps that led to the best
    assert plan.cooldown.end() == end
    rate = lambda step: plan.learning_rate(schedule.Position(step, 1.0, 30.0))  # noqa: E731
    assert rate(300) == pytest.approx(4e-3) and rate(end) == pytest.approx(5e-3 * 0.05)
    assert rate(299) == pytest.approx(schedule.cosine_rate(config, 299, 30.0 / 600))  # before it: the curve
    assert plan.limit_reached(schedule.Position(end - 1, 1.0, 30.0)) is None
    assert plan.limit_reached(schedule.Position(end, 1.0, 30.0)) == "patience"
    # evaluations at each quarter of the cooldown (its best point is kept), then the final one at its end
    due = [step for step in range(300, end) if plan.eval_due(schedule.Position(step, 0.0, 30.0))]
    assert due == [325, 350, 375]


def test_a_stall_close_to_the_end_leaves_the_schedule_to_cool_the_run():
    config = TrainConfig(max_time=600, lr=5e-3)
    plan = schedule.Schedule(config)
    # 300 steps in 60 s of 600: ~2,700 left, a cooldown of half the best's 200 steps fits
    assert plan.cooldown_at(schedule.Position(300, 1.0, 60.0), best_step=200, best_lr=4e-3) is not None
    # 2,700 steps in 540 s: ~300 left, fewer than the 1,000 a cooldown from a best at step 2,000 would take
    assert plan.cooldown_at(schedule.Position(2700, 1.0, 540.0), best_step=2000, best_lr=4e-3) is None
    assert plan.steps_left(schedule.Position(2700, 1.0, 540.0)) == pytest.approx(300)
