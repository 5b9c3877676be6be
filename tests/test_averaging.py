"""The weight average (charlm/averaging.py and its hook in the Trainer, TrainConfig.average; off by default and
not a command-line option: BENCHMARKS.md 14b measured no gain at the end of a run): the average is the moving
average it says it is, scoring it leaves the trained weights untouched, a resumed run averages on exactly as
an unbroken one, and each evaluation's metrics row and best.pt name and hold the weights that won."""

from __future__ import annotations

import json

import pytest
import torch

from charlm import checkpoint as ckpt
from charlm.averaging import WeightAverage
from charlm.corpus import decode_corpus, split_train_val
from charlm.evaluation import EVAL_SEQ_LEN, evaluate
from charlm.model import CharRNN, ModelConfig
from charlm.train import TrainConfig, Trainer

from conftest import word_text


def test_the_average_follows_the_ramped_exponential_formula():
    model = torch.nn.Linear(3, 2)
    average = WeightAverage(model, 0.5)
    expected = [p.detach().clone() for p in model.parameters()]
    for value in (1.0, -2.0, 4.0, 0.5):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(value)
        # the ramp: min(decay, (1 + n) / (10 + n)) after n updates, written out by hand
        decay = min(0.5, (1 + average.updates) / (10 + average.updates))
        expected = [decay * e + (1 - decay) * value for e in expected]
        average.update(model)
    for s, e in zip(average.shadow, expected):
        assert torch.allclose(s, e)


def test_applied_swaps_the_average_in_and_the_trained_weights_back_even_on_an_error():
    model = torch.nn.Linear(4, 4)
    average = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with average.applied(model):
        assert torch.equal(model.weight, average.shadow[0])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError):
        with average.applied(model):
            raise RuntimeError("scoring failed")
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def _trainer(tmp_path, name, max_steps, resume=None, stop_at=None, average=0.9, lr=3e-2, eval_chars=512,
             min_lr_frac=0.05):
    corpus = decode_corpus(word_text(400).encode(), "t.txt")
    train_ids, val_ids = split_train_val(corpus.ids, 0.1)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, hidden=24, layers=1, dropout=0.0))
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    config = TrainConfig(batch_size=8, seq_len=16, max_steps=max_steps, eval_every=10, warmup_steps=5, lr=lr,
                         min_lr_frac=min_lr_frac,
                         precision="fp32", eval_chars=eval_chars, average=average, patience=0)
    holder = {}

    def callback(event, data):
        if event == "step" and stop_at and data["step"] == stop_at:
            holder["t"].request_stop("interrupt")

    trainer = Trainer(model, train_ids, val_ids, config, tmp_path / name, torch.device("cpu"), meta, callback=callback,
                      resume=resume)
    holder["t"] = trainer
    return trainer


def test_a_resumed_run_with_an_average_ends_as_the_unbroken_one(tmp_path, one_thread):
    whole = _trainer(tmp_path, "whole", 60)
    whole_result = whole.run()
    cut = _trainer(tmp_path, "cut", 60, stop_at=27)
    assert cut.run().stopped_by == "interrupt"
    assert "average" in ckpt.load(tmp_path / "cut", prefer=ckpt.LAST)
    rest = _trainer(tmp_path, "cut", 60, resume=ckpt.load(tmp_path / "cut", prefer=ckpt.LAST))
    rest_result = rest.run()
    assert rest_result.step == 60
    # the trained weights and the average over them: bit for bit
    assert all(torch.equal(a, b) for a, b in zip(whole.model.state_dict().values(), rest.model.state_dict().values()))
    assert rest.average.updates == whole.average.updates == 60
    assert all(torch.equal(a, b) for a, b in zip(whole.average.shadow, rest.average.shadow))
    # ...and so every evaluation's two scores, the winner, the best checkpoint and the final report
    keys = ("step", "raw_val_loss", "average_val_loss", "weights", "val_loss", "best")
    assert [[m[k] for k in keys] for m in rest_result.metrics] == [[m[k] for k in keys] for m in whole_result.metrics]
    assert rest_result.best_val_loss == whole_result.best_val_loss
    assert rest_result.full_val is not None and rest_result.full_val == whole_result.full_val
    best_whole = ckpt.load(tmp_path / "whole", prefer=ckpt.BEST)["model"]
    best_rest = ckpt.load(tmp_path / "cut", prefer=ckpt.BEST)["model"]
    assert all(torch.equal(best_whole[k], best_rest[k]) for k in best_whole)


def _scored(model_state: dict, trainer: Trainer, streams) -> float:
    model = CharRNN(trainer.model.config)
    model.load_state_dict(model_state)
    total, count = evaluate(model, streams, EVAL_SEQ_LEN, torch.device("cpu"), "fp32")
    return total / count


def test_each_metrics_row_names_the_weights_it_kept_and_best_pt_holds_them(tmp_path, one_thread):
    # a high rate held to the end: the trained weights jitter from step to step, where the average (over ~10
    # steps) is the calmer one, and early on the average still remembers worse weights; with this seed both
    # win some rows, and the average wins the last one, which is the best
    trainer = _trainer(tmp_path, "run", 120, average=0.9, lr=5e-2, min_lr_frac=1.0)
    result = trainer.run()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics
    for row in rows:
        assert row["weights"] == ("average" if row["average_val_loss"] < row["raw_val_loss"] else "raw")
        assert row["val_loss"] == min(row["raw_val_loss"], row["average_val_loss"])
    assert {row["weights"] for row in rows} == {"raw", "average"}, "the seed no longer exercises both winners"
    best = min(rows, key=lambda row: row["val_loss"])
    assert best["best"] and result.best_step == best["step"]
    assert best["weights"] == "average" and best["step"] == result.step, "the seed no longer has the average win last"
    # best.pt holds the weights that scored the best row's loss (on the same periodic sample)
    payload = ckpt.load(tmp_path / "run", prefer=ckpt.BEST)
    assert payload["step"] == best["step"]
    assert _scored(payload["model"], trainer, trainer.val_streams) == pytest.approx(best["val_loss"], abs=1e-5)
    # and the final report (float32, the whole tail) scores those same weights, not the ones trained on
    assert result.full_val["step"] == best["step"]
    assert _scored(payload["model"], trainer, trainer.val_full) == pytest.approx(result.full_val["loss"], abs=1e-5)


def test_without_an_average_the_rows_and_checkpoints_are_as_before(tmp_path, one_thread):
    trainer = _trainer(tmp_path, "plain", 20, average=0.0)
    result = trainer.run()
    assert trainer.average is None
    assert all("weights" not in row and "average_val_loss" not in row for row in result.metrics)
    assert "average" not in ckpt.load(tmp_path / "plain", prefer=ckpt.LAST)
