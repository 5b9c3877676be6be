"""Defaults that size themselves: the rule at its corners, explicit flags winning, the summary, resume, and
evaluation by time."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from charlm import autosize, schedule
from charlm import checkpoint as ckpt
from charlm.autosize import DeviceSpeed, choose
from charlm.cli.display import human_count
from charlm.train import TrainConfig
from conftest import run_cli, word_text

# Two devices described by the cost model: seconds per step = step_s + flop_s x FLOPs. The slow one is
# roughly a busy 2-core CPU (~60 GFLOP/s achieved), the fast one a GPU (~50 TFLOP/s, 1 ms per step).
SLOW = DeviceSpeed(step_s=0.004, flop_s=1 / 60e9)
FAST = DeviceSpeed(step_s=0.001, flop_s=1 / 50e12)


def test_bigger_budgets_and_faster_devices_get_bigger_models():
    a = choose(10_000_000, 65, seconds=60, speed=SLOW)
    b = choose(10_000_000, 65, seconds=600, speed=SLOW)
    c = choose(10_000_000, 65, seconds=600, speed=FAST, gpu=True)
    assert a.parameters < b.parameters < c.parameters
    assert a.hidden < b.hidden < c.hidden
    assert c.batch_size > b.batch_size  # a GPU is given wide steps
    for choice in (a, b, c):  # each model is one its budget can train
        assert choice.parameters <= autosize.trainable(choice.planned_chars)


def test_a_two_kilobyte_text_gets_a_small_model_with_dropout():
    tiny = choose(2_000, 40, seconds=600, speed=FAST, gpu=True)  # all the compute in the world...
    assert tiny.parameters <= autosize.DATA_PARAMS_PER_CHAR * 2_000  # ...but the text cannot feed more
    assert tiny.dropout >= 0.2  # it will be read hundreds of times
    assert tiny.batch_size * tiny.seq_len * 4 <= 2_000 * 4  # streams hold whole chunks of a small text


def test_thirty_seconds_gets_a_small_fast_layout():
    short = choose(1_000_000, 65, seconds=30, speed=SLOW)
    long = choose(1_000_000, 65, seconds=600, speed=SLOW)
    assert short.hidden < long.hidden
    assert short.batch_size * short.seq_len < long.batch_size * long.seq_len  # more, smaller steps
    steps = short.planned_chars / (short.batch_size * short.seq_len)
    assert steps >= 300  # enough updates for the schedule to work in half a minute


def test_thousands_of_characters_get_an_embedding_and_small_sets_one_hot():
    big_vocab = choose(5_000_000, 5_000, seconds=120, speed=SLOW)
    assert big_vocab.embedding >= 128
    assert choose(5_000_000, 65, seconds=7200, speed=SLOW).embedding == 0
    # the embedding keeps the input layer cheap: without it the first layer would be 5000 wide
    h, n = big_vocab.hidden, big_vocab.layers
    assert autosize.train_flops_per_char("gru", 5_000, h, n, big_vocab.embedding) < \
        autosize.train_flops_per_char("gru", 5_000, h, n, 0) * 0.8


def test_a_gigabyte_is_compute_bound_and_read_about_once():
    huge = choose(1_000_000_000, 200, seconds=600, speed=SLOW)
    assert huge.planned_chars < 1_000_000_000  # the budget reads a fraction of it
    assert huge.dropout == 0.0  # nothing is seen twice, nothing to regularise
    assert huge.parameters <= autosize.trainable(huge.planned_chars)
    assert huge.hidden >= 256


def test_step_and_epoch_budgets_plan_from_what_they_read():
    by_steps = choose(10_000_000, 65, steps=100)
    assert by_steps.planned_chars == 100 * by_steps.batch_size * by_steps.seq_len
    by_epochs = choose(200_000, 65, epochs=3)
    assert by_epochs.planned_chars == 600_000
    assert choose(200_000, 65, epochs=50).dropout > by_epochs.dropout
    # weight decay follows the passes too: a text read once is barely pulled toward zero, one reread is
    once, reread, many = (choose(200_000, 65, epochs=e) for e in (1, 4, 20))
    assert once.weight_decay <= 0.01 < 0.1 <= reread.weight_decay < many.weight_decay


def test_given_values_are_kept_and_the_rest_fit_around_them():
    free = choose(3_000_000, 65, seconds=300, speed=SLOW)
    fixed = choose(3_000_000, 65, seconds=300, speed=SLOW, fixed={"hidden": 64, "seq_len": 32, "dropout": 0.5})
    assert (fixed.hidden, fixed.seq_len, fixed.dropout) == (64, 32, 0.5)
    assert fixed.hidden != free.hidden
    assert fixed.planned_chars > free.planned_chars  # a smaller model reads more in the same time


def test_flags_reproduce_the_choice():
    choice = choose(500_000, 90, seconds=120, speed=SLOW)
    words = autosize.flags(choice).split()
    given = {words[i].lstrip("-").replace("-", "_"): float(words[i + 1]) for i in range(0, len(words), 2)}
    again = choose(500_000, 90, seconds=120, speed=SLOW,
                   fixed={k: (v if k in ("dropout", "weight_decay") else int(v)) for k, v in given.items()})
    sizes = ("hidden", "layers", "embedding", "dropout", "weight_decay", "batch_size", "seq_len", "parameters")
    assert [getattr(again, k) for k in sizes] == [getattr(choice, k) for k in sizes]


def test_probe_measures_this_device_and_leaves_the_seeded_rng_alone():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    speed = autosize.probe(torch.device("cpu"), "gru", 40, 0, "fp32", limit_s=2.0)
    # its random inputs and weights come from the global generator: a --seed run's stream must not move
    assert torch.equal(torch.get_rng_state(), before)
    assert speed.probe_s > 0 and 0 < speed.flop_s < float("inf") and 0 <= speed.step_s < float("inf")
    small, big = (autosize.train_flops_per_char("gru", 40, h, 2, 0) for h in (128, 384))
    assert speed.chars_per_s(big, 2048) < speed.chars_per_s(small, 2048)  # a wider model reads slower


def test_train_with_auto_sizes_shows_and_saves_the_choice_and_resume_keeps_it(tmp_path):
    corpus = tmp_path / "notes.txt"
    # 7,900 characters: even a busy machine reads them more than twice in six seconds (with 23,000 a loaded
    # one planned fewer passes, and the weaker decay, below)
    corpus.write_text(word_text(200), encoding="utf-8")
    out = tmp_path / "run"
    first = run_cli("train", corpus, "--out", out, "--max-time", "6s", "--no-preview", "--embedding", "16",
                    cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "sizing" in first.stderr and "auto (" in first.stderr and "embedding" not in \
        first.stderr.split("auto (")[1].split(")")[0]  # the given --embedding is not chosen
    assert re.search(r"after \d+:\d\d, \d+\.\d% of it evaluating and saving", first.stderr)  # what evaluations cost
    repeat = next(line for line in first.stderr.splitlines() if line.startswith("repeat with"))
    assert "--embedding 16" in repeat
    saved = torch.load(out / "last.pt", weights_only=True)
    assert saved["model_config"]["embedding"] == 16
    assert saved["sizing"]["choice"]["hidden"] == saved["model_config"]["hidden"]
    assert f"--hidden {saved['model_config']['hidden']}" in repeat
    # six seconds read these notes many times over: the optimizer ran with the chosen, stronger decay
    decay = saved["train_config"]["weight_decay"]
    assert decay == saved["sizing"]["choice"]["weight_decay"] > TrainConfig.weight_decay
    assert {g["weight_decay"] for g in saved["optimizer"]["param_groups"]} == {decay, 0.0}
    resumed = run_cli("train", corpus, "--out", out, "--max-time", "9s", "--no-preview", "--embedding", "16",
                      "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "kept from the run" in resumed.stderr
    again = torch.load(out / "last.pt", weights_only=True)
    assert again["model_config"] == saved["model_config"]
    assert again["train_config"]["batch_size"] == saved["train_config"]["batch_size"]


def test_explicit_flags_skip_the_probe_and_win(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(word_text(300), encoding="utf-8")
    result = run_cli("train", corpus, "--out", tmp_path / "r", "--max-steps", "3", "--hidden", "40", "--layers", "1",
                     "--embedding", "0", "--dropout", "0", "--weight-decay", "0.05", "--batch-size", "8", "--seq-len",
                     "16", "--no-preview", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sizing" not in result.stderr and "1 x 40 gru" in result.stderr and "8 streams x 16" in result.stderr
    assert ckpt.load(tmp_path / "r")["train_config"]["weight_decay"] == 0.05


def _cadence(max_time: float, seconds: np.ndarray, cost: float = 0.0) -> list:
    """When a run with this time budget evaluates (charlm.schedule.Schedule, which the Trainer asks after every
    step), given the run's clock at each step and the seconds each evaluation took."""
    plan = schedule.Schedule(TrainConfig(max_time=max_time))
    plan.start(schedule.Position(0, 0.0, 0.0), None)
    due = []
    for step, now in enumerate(seconds, 1):
        if plan.eval_due(schedule.Position(step, 0.0, float(now))):
            due.append(float(now))
            plan.evaluated(float(now), cost)
    return due


@pytest.mark.parametrize("budget", [45.0, 120.0, 600.0])
def test_evaluations_come_by_time(budget):
    due = _cadence(budget, np.arange(0.5, budget, 0.5))
    assert due[0] <= max(15.0, 0.1 * budget) + 1.0 and due[0] >= 15.0  # first: 15 s or 10%, the later
    gaps = np.diff(due)
    assert (gaps >= 0.1 * budget - 0.51).all() and (gaps <= 0.1 * budget + 0.51).all()  # then every 10%
    if budget >= 120:
        assert len(due) >= 5


def test_a_small_text_read_many_times_is_evaluated_after_every_pass_a_large_one_by_tenths():
    def due(passes_per_run: float) -> list:  # a 10-minute run, a step every 0.5 s
        plan = schedule.Schedule(TrainConfig(max_time=600.0))
        plan.start(schedule.Position(0, 0.0, 0.0), None)
        out = []
        for step, now in enumerate(np.arange(0.5, 600.0, 0.5), 1):
            if plan.eval_due(schedule.Position(step, passes_per_run * now / 600, float(now))):
                out.append(float(now))
                plan.evaluated(float(now), 0.1)  # 0.1 s an evaluation: no closer than 3 s apart
        return out

    small, large = due(200.0), due(6.0)  # a pass every 3 s; every 100 s
    assert small[0] == pytest.approx(15.0, abs=0.6) and (np.diff(small) <= 3.6).all() and len(small) > 150
    assert (np.diff(large) >= 59.4).all() and len(large) <= 10  # tenths of the budget, as before


def test_a_longer_budget_buys_more_steps_not_wider_ones():
    three = choose(1_000_000, 65, seconds=180, speed=SLOW)
    ten = choose(1_000_000, 65, seconds=600, speed=SLOW)
    width = [c.batch_size * c.seq_len for c in (three, ten)]
    steps = [c.planned_chars / w for c, w in zip((three, ten), width)]
    assert width[0] <= width[1] <= autosize.MAX_STEP_CHARS  # the sweep's best width, at 3 minutes and at 10
    assert steps[1] > 1.3 * autosize.TARGET_STEPS  # what ten minutes read beyond that width, in more steps
    # a run that reads hundreds of millions of characters (a GPU's ten minutes) takes wider steps
    gpu = choose(100_000_000, 65, seconds=600, speed=FAST, gpu=True)
    assert gpu.batch_size * gpu.seq_len > 4 * autosize.MAX_STEP_CHARS


def test_a_large_text_of_few_characters_read_about_once_takes_wide_steps_a_small_one_more_updates():
    # a minute on a busy CPU: a 4 MB text of 96 characters is read a fraction of the way through, so its
    # steps are the widest this plan allows (a wide step reads more characters a second), not the ~1,400
    # updates a text read several times gets
    large = choose(4_000_000, 96, seconds=60, speed=SLOW)
    small = choose(230_000, 96, seconds=60, speed=SLOW)
    assert large.planned_chars <= autosize.READ_ONCE * 4_000_000  # read about once...
    assert small.planned_chars > autosize.READ_ONCE * 230_000  # ...and a small text read several times
    assert large.batch_size * large.seq_len == autosize.MAX_STEP_CHARS
    assert small.batch_size * small.seq_len < autosize.MAX_STEP_CHARS
    assert small.planned_chars / (small.batch_size * small.seq_len) > 1.5 * large.planned_chars / (
        large.batch_size * large.seq_len)
    # a large alphabet's decoder costs every row alike: wider steps would only halve its updates
    chinese = choose(4_000_000, 6_174, seconds=60, speed=SLOW)
    assert chinese.batch_size * chinese.seq_len < autosize.MAX_STEP_CHARS


def test_no_step_is_narrower_than_sixteen_streams_not_for_more_updates_nor_for_a_large_vocabulary():
    # 1.2M characters of Chinese, 6,174 distinct, on a busy CPU: the logits' memory cap and the wish for 400
    # updates gave 8-10 streams, whose weights chase the few places they read (0.43-0.49 nats/char behind 16
    # streams at 1 minute, side by side)
    for seconds in (30, 60, 180, 600):
        one = choose(1_080_000, 6_174, seconds=seconds, speed=SLOW)
        assert one.batch_size * one.seq_len >= autosize.MIN_STEP_CHARS == 16 * 64
        two = choose(1_080_000, 6_174, seconds=seconds, speed=SLOW, world=2)
        assert two.batch_size * two.seq_len >= 2 * autosize.MIN_STEP_CHARS  # as wide in each process
    # a step wider than that still keeps its logits within the cap (a GPU's hour on the same alphabet)
    wide = choose(50_000_000, 6_174, seconds=3600, speed=FAST, gpu=True)
    assert autosize.MIN_STEP_CHARS < wide.batch_size * wide.seq_len <= autosize.LOGITS_PER_STEP / 6_174
    # and a small text still gets fewer streams: each holds whole chunks of its own
    small = choose(3_000, 6_174, seconds=60, speed=SLOW)
    assert small.batch_size * small.seq_len * 4 <= 3_000


def test_costly_evaluations_are_spaced_by_their_cost_and_none_falls_just_before_the_end():
    # 1.5 s an evaluation in a 3-minute run: 10% of the budget (18 s) would spend 8% of it evaluating
    due = _cadence(180.0, np.arange(0.5, 180.0, 0.5), cost=1.5)
    assert (np.diff(due) >= 30 * 1.5 - 0.01).all()  # at most ~3% of the run
    assert due[-1] <= 180.0 - 30 * 1.5  # the final evaluation at the end is the next one
    assert len(due) >= 3
    # the quick start's 2 minutes at ~0.6 s an evaluation still show five lines before the final one
    assert len(_cadence(120.0, np.arange(0.5, 120.0, 0.5), cost=0.6)) >= 5


def test_the_evaluation_sample_is_sized_to_the_budget_kept_on_resume_and_given_values_win(tmp_path):
    assert autosize.eval_chars(100_000) == 16_384 and autosize.eval_chars(1e9) == 65_536
    assert autosize.eval_chars(2e6) < autosize.eval_chars(5e6)  # a longer run affords a larger sample
    corpus = tmp_path / "notes.txt"
    corpus.write_text(word_text(20_000), encoding="utf-8")  # 78k validation characters: more than any sample

    def scored(out):
        return {json.loads(line)["val_chars"] for line in (out / "metrics.jsonl").read_text().splitlines()}

    out = tmp_path / "run"
    first = run_cli("train", corpus, "--out", out, "--max-time", "5s", "--no-preview", "--no-items", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    # the sample follows the rule from what this run planned to read (a fast machine plans more in 5 s)
    saved = torch.load(out / "last.pt", weights_only=True)
    sample = autosize.eval_chars(saved["sizing"]["choice"]["planned_chars"])
    assert saved["train_config"]["eval_chars"] == sample
    shown = human_count(sample)
    assert f"a fixed sample of {shown}" in first.stderr and f"/{shown} (" in first.stderr and scored(out) == {sample}
    resumed = run_cli("train", corpus, "--out", out, "--max-time", "8s", "--no-preview", "--no-items", "--resume",
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert scored(out) == {sample}  # the same sample, so the resumed evaluations compare with the first ones
    given = run_cli("train", corpus, "--out", tmp_path / "given", "--max-steps", "4", "--eval-chars", "20000",
                    "--hidden", "32", "--layers", "1", "--embedding", "0", "--dropout", "0", "--batch-size", "8",
                    "--seq-len", "16", "--no-preview", "--no-items", cwd=tmp_path)
    assert given.returncode == 0, given.stderr
    assert scored(tmp_path / "given") == {20_000}


def test_a_short_time_budget_on_a_small_alphabet_learns_an_embedding_and_a_long_one_stays_one_hot():
    # a 250 KB manual of 96 characters: at 90 s one-hot input lagged a small learned one by 0.3 nats/char
    short = choose(235_000, 96, seconds=90, speed=SLOW)
    assert 0 < short.embedding < 96  # learned, and narrower than the one-hot input it replaces
    long = choose(10_000_000, 96, seconds=7200, speed=SLOW)  # two hours: past what was measured
    assert long.embedding == 0 and long.planned_chars > short.planned_chars
    # the user's --embedding wins either way, and a step budget keeps the input its runs always had
    assert choose(235_000, 96, seconds=90, speed=SLOW, fixed={"embedding": 0}).embedding == 0
    assert choose(235_000, 96, steps=300).embedding == 0
    # the rest of the choice still fits the budget around the embedding
    assert short.parameters <= autosize.trainable(short.planned_chars)
    assert short.planned_chars / (short.batch_size * short.seq_len) >= autosize.MIN_STEPS


def test_a_short_time_budget_on_a_large_alphabet_learns_a_narrower_embedding():
    # 25,000 characters of Tang poems, 2,409 distinct: at 1 minute a 64-wide input beat the 128 a long run gets
    short = choose(22_500, 2_409, seconds=60, speed=SLOW)
    assert short.planned_chars <= autosize.SHORT_PLAN
    assert short.embedding == 64 and autosize.embedding_for(2_409) == 128
    assert choose(22_500, 2_409, steps=300).embedding == 128  # a step budget keeps the width it always had
    # six thousand characters: half of 256 in minutes, the full width for a run that reads past SHORT_PLAN
    assert choose(1_100_000, 6_174, seconds=180, speed=SLOW).embedding == 128
    assert choose(1_100_000, 6_174, seconds=7200, speed=FAST, gpu=True).embedding == 256
    assert choose(22_500, 2_409, seconds=60, speed=SLOW, fixed={"embedding": 200}).embedding == 200
    # past the full width's cap (256) too: half of it
    assert choose(2_000_000, 20_000, seconds=60, speed=SLOW).embedding == 128


def test_a_short_timed_run_builds_the_embedding_it_chose(tmp_path):
    corpus = tmp_path / "notes.txt"
    corpus.write_text(word_text(600), encoding="utf-8")
    out = tmp_path / "run"
    result = run_cli("train", corpus, "--out", out, "--max-time", "3s", "--no-preview", "--no-items", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = torch.load(out / "last.pt", weights_only=True)
    width = saved["sizing"]["choice"]["embedding"]
    assert width > 0  # a learned input, not one-hot
    assert saved["model_config"]["embedding"] == width and saved["model"]["embed.weight"].shape[1] == width
    assert f"embedding {width}" in result.stderr  # the summary names the input it built
