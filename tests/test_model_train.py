"""The model and the training loop: it learns, the carried state matters, runs are reproducible."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from charlm import checkpoint as ckpt
from charlm.corpus import decode_corpus, split_train_val
from charlm.streams import make_streams
from charlm.evaluation import evaluate_text
from charlm.model import CharRNN, ModelConfig, layer_parameter_counts
from charlm.schedule import cosine_rate as learning_rate
from charlm.score import default_context_id
from charlm.train import TrainConfig, Trainer, evaluate

from conftest import word_text


@pytest.mark.parametrize("cell,nonlinearity", [("rnn", "tanh"), ("rnn", "relu"), ("gru", "tanh"), ("lstm", "tanh")])
@pytest.mark.parametrize("embedding", [0, 8])
def test_step_matches_forward(cell, nonlinearity, embedding):
    model = CharRNN(ModelConfig(vocab_size=13, cell=cell, nonlinearity=nonlinearity, hidden=24, layers=2,
                                embedding=embedding, dropout=0.5)).eval()
    ids = torch.randint(0, 13, (3, 9))
    logits, final = model(ids, model.init_state(3))
    state, stepped = model.init_state(3), []
    for t in range(9):
        out, state = model.step(ids[:, t], state)
        stepped.append(out)
    assert torch.allclose(torch.stack(stepped, 1), logits, atol=1e-5)
    for a, b in zip(final if isinstance(final, tuple) else (final,), state if isinstance(state, tuple) else (state,)):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("embedding,hidden", [(0, 64), (0, 384), (32, 128), (32, 384), (256, 64)])
def test_the_first_layer_hears_its_input_at_the_same_strength_whatever_the_input(cell, embedding, hidden):
    """A new model's first-layer input pre-activations have a standard deviation of about INPUT_STD for one-hot
    and embedded inputs of any width and any layer size (at PyTorch's own scale a one-hot character of a
    384-unit layer enters at 0.03 and a 256-wide embedding of a 64-unit one at 1.2)."""
    from charlm.model import INPUT_STD

    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=65, cell=cell, hidden=hidden, layers=2, embedding=embedding))
    x = model.encode(torch.arange(65))  # every character once
    pre = x @ model.rnn.weight_ih_l0.t()  # (65, G*H)
    assert pre.std().item() == pytest.approx(INPUT_STD, rel=0.1)
    assert 0.3 <= INPUT_STD <= 1.0  # neither PyTorch's faint default nor saturating gates
    deeper = model.rnn.weight_hh_l0  # the rest keeps PyTorch's initialisation
    assert deeper.abs().max().item() <= hidden ** -0.5


@pytest.mark.parametrize("cell,embedding", [("rnn", 0), ("gru", 16), ("lstm", 0)])
def test_parameter_counts_match_pytorch(cell, embedding):
    config = ModelConfig(vocab_size=65, cell=cell, hidden=32, layers=3, embedding=embedding)
    rows = layer_parameter_counts(config)
    assert sum(r[2] for r in rows) == CharRNN(config).num_parameters()
    if cell == "rnn":  # the formula for a tanh layer: H*I + H*H + 2H
        assert rows[1][2] == 32 * 65 + 32 * 32 + 2 * 32


@pytest.mark.parametrize("vocab", [10, 65, 300])
def test_untrained_loss_is_about_ln_vocab(vocab):
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=vocab, hidden=64))
    ids = torch.randint(0, vocab, (8, 50))
    logits, _ = model(ids, model.init_state(8))
    loss = F.cross_entropy(logits.reshape(-1, vocab), ids.reshape(-1)).item()
    assert abs(loss - math.log(vocab)) < 0.1 * math.log(vocab)


def test_learning_rate_warms_up_then_decays_to_floor():
    c = TrainConfig(lr=1e-2, warmup_steps=10, min_lr_frac=0.1)
    assert learning_rate(c, 0, 0.0) == pytest.approx(1e-3)
    assert learning_rate(c, 10, 0.0) == pytest.approx(1e-2)
    assert learning_rate(c, 50, 0.5) == pytest.approx(1e-3 + 9e-3 * 0.5)
    assert learning_rate(c, 99, 1.0) == pytest.approx(1e-3)


def unigram_entropy(ids) -> float:
    counts = np.bincount(ids).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train_small(tmp_path, text, cell="rnn", steps=150, seq_len=32, hidden=64, **overrides):
    corpus = decode_corpus(text.encode(), "t.txt")
    train_ids, val_ids = split_train_val(corpus.ids, 0.1)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, cell=cell, hidden=hidden, layers=1))
    config = TrainConfig(**{"batch_size": 16, "seq_len": seq_len, "max_steps": steps, "eval_every": steps,
                            "lr": 5e-3, "precision": "fp32", **overrides})
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    trainer = Trainer(model, train_ids, val_ids, config, tmp_path / cell, torch.device("cpu"), meta)
    return trainer.run(), corpus, val_ids, model


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_each_cell_learns_well_below_unigram_entropy(tmp_path, cell):
    result, corpus, val_ids, _ = train_small(tmp_path, word_text(800), cell=cell)
    h1 = unigram_entropy(corpus.ids)
    assert result.stopped_by == "max_steps"
    assert result.best_val_loss < 0.7 * h1, (result.best_val_loss, h1)
    assert (tmp_path / cell / "best.pt").is_file() and (tmp_path / cell / "metrics.jsonl").is_file()


def long_range_text(lines=1500, gap=10, seed=0) -> str:
    """Each line repeats its first letter after `gap` dashes: predicting it needs state from far back."""
    rng = random.Random(seed)
    return "".join(f"{c}{'-' * gap}{c}\n" for c in (rng.choice("abcdefgh") for _ in range(lines)))


def test_carried_state_beats_reset_state(tmp_path):
    result, corpus, val_ids, model = train_small(tmp_path, long_range_text(), cell="gru", steps=200, seq_len=32)
    streams = make_streams(val_ids, 4)
    total, count = evaluate(model, streams, 8, "cpu")
    stateful = total / count
    reset_total = 0.0
    model.eval()
    with torch.no_grad():
        for k in range(streams.num_chunks(8)):  # the same pass, but the state starts from zero every chunk
            x, y = streams.chunk(k, 8)
            logits, _ = model(x, model.init_state(streams.rows))
            reset_total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-1,
                                           reduction="sum").item()
    reset = reset_total / count
    assert stateful < 0.6 * reset, (stateful, reset)


def test_same_seed_same_run(tmp_path):
    a, *_ , ma = train_small(tmp_path / "a", word_text(300), steps=20)
    b, *_ , mb = train_small(tmp_path / "b", word_text(300), steps=20)
    assert a.best_val_loss == b.best_val_loss
    assert all(torch.equal(p, q) for p, q in zip(ma.state_dict().values(), mb.state_dict().values()))


def test_nonfinite_loss_stops_without_overwriting_best(tmp_path):
    """A real divergence, no stub: a relu RNN trained sanely, then resumed with lr 1e6 and no effective clip,
    overflows to inf within a few steps; the loop must stop there and leave the earlier best.pt alone."""
    from charlm import checkpoint as ckpt

    corpus = decode_corpus(word_text(300).encode(), "t.txt")
    train_ids, val_ids = split_train_val(corpus.ids, 0.1)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, cell="rnn", nonlinearity="relu", hidden=32, layers=1))
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    sane = TrainConfig(batch_size=8, seq_len=16, max_steps=10, eval_every=5, lr=1e-2, precision="fp32")
    assert Trainer(model, train_ids, val_ids, sane, tmp_path, torch.device("cpu"), meta).run().best_step == 10
    best_before = (tmp_path / "best.pt").read_bytes()
    absurd = TrainConfig(batch_size=8, seq_len=16, max_steps=40, eval_every=5, lr=1e6, clip=1e9, warmup_steps=0,
                         precision="fp32")
    resumed = Trainer(model, train_ids, val_ids, absurd, tmp_path, torch.device("cpu"), meta,
                      resume=ckpt.load(tmp_path, prefer=ckpt.LAST))
    result = resumed.run()
    assert result.stopped_by == "nonfinite" and 10 < result.step < 40
    assert (tmp_path / "best.pt").read_bytes() == best_before
    assert result.best_step == 10


def test_bf16_runs_evaluate_periodically_in_bf16_and_report_the_best_model_in_float32(tmp_path):
    """Periodic passes run in the training precision (cheaper); the final figure is float32 on the whole tail,
    even when the periodic sample already covered all of it."""
    result, corpus, val_ids, model = train_small(tmp_path, word_text(), cell="gru", steps=40, precision="bf16",
                                                 eval_every=20, eval_chars=0)
    assert result.full_val is not None  # a float32 report, though the sample was the whole tail
    best = CharRNN(model.config)
    best.load_state_dict(ckpt.load(tmp_path / "gru" / ckpt.BEST)["model"])
    start = default_context_id(corpus.vocab)  # every stream starts after the text's line break, as sampling does
    full32 = evaluate_text(best, val_ids, "cpu", streams=32, precision="fp32", context_id=start)
    half = evaluate_text(best, val_ids, "cpu", streams=32, precision="bf16", context_id=start)
    assert result.full_val["loss"] == pytest.approx(full32["loss"], abs=1e-5)
    assert result.best_val_loss == pytest.approx(half["loss"], abs=1e-5)
