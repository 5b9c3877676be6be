"""Sampling and checkpoints: primes lead, seeds repeat, files are safe to load and hard to damage."""

import json
import os
import random
import stat

import pytest
import torch

from charlm import checkpoint as ckpt
from charlm.errors import CharlmError
from charlm.model import CharRNN, ModelConfig
from charlm.sample import SampleConfig, pick, sample_text
from charlm.vocab import Vocabulary


def tiny_model(vocab="\nabc"):
    torch.manual_seed(0)
    return CharRNN(ModelConfig(vocab_size=len(vocab), hidden=16, layers=1)), Vocabulary(vocab)


def test_sample_starts_with_prime_and_has_length():
    model, vocab = tiny_model()
    texts = sample_text(model, vocab, "abc", SampleConfig(length=40, num_samples=3, seed=1))
    assert all(t.startswith("abc") and len(t) == 43 for t in texts)


def test_same_seed_same_text_other_seed_other_text():
    model, vocab = tiny_model()
    a = sample_text(model, vocab, "a", SampleConfig(length=200, seed=7, temperature=1.5))
    b = sample_text(model, vocab, "a", SampleConfig(length=200, seed=7, temperature=1.5))
    c = sample_text(model, vocab, "a", SampleConfig(length=200, seed=8, temperature=1.5))
    assert a == b and a != c


def test_sampling_without_a_seed_leaves_the_global_rng_alone():
    """No --seed: each call draws its own seed, without touching torch's global RNG (a training run's
    previews sample between steps, and the run's randomness must not depend on them)."""
    from charlm.items import sample_items

    model, vocab = tiny_model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = sample_text(model, vocab, "a", SampleConfig(length=200, temperature=1.5))
    sample_items(model, vocab, 3, set(), temperature=1.5, max_length=20, allow_copies=True, batch=8)
    assert torch.equal(torch.get_rng_state(), before)
    b = sample_text(model, vocab, "a", SampleConfig(length=200, temperature=1.5))
    assert a != b  # and still a fresh seed each time


def test_batched_samples_are_independent():
    model, vocab = tiny_model()
    texts = sample_text(model, vocab, "a", SampleConfig(length=100, num_samples=4, seed=3, temperature=2.0))
    assert len(set(texts)) == 4


def test_top_k_and_top_p_restrict_choices():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(pick(logits, SampleConfig(top_k=2, temperature=5.0), gen).tolist()) == {0, 1}
    # p(0) = 0.72, p(1) = 0.26: top-p 0.5 keeps only the first, 0.9 the first two
    assert set(pick(logits, SampleConfig(top_p=0.5), gen).tolist()) == {0}
    assert set(pick(logits, SampleConfig(top_p=0.9, temperature=1.0), gen).tolist()) <= {0, 1}
    assert pick(logits[:1], SampleConfig(greedy=True), gen).item() == 0


def test_stop_string_ends_sample_early():
    model, vocab = tiny_model("ab")
    with torch.no_grad():  # a model that always says "a": the stop string "aa" arrives at once
        model.decoder.bias.copy_(torch.tensor([10.0, -10.0]))
        model.decoder.weight.zero_()
    text = sample_text(model, vocab, "b", SampleConfig(length=100, stop="aa", seed=0))[0]
    assert text == "baa"


def test_a_stop_string_arriving_over_several_steps_ends_that_row_and_shows_nothing_after():
    from charlm.sample import StopMatcher

    stops = StopMatcher("ab", rows=2)
    assert stops.add(["a", "a"]) == ["a", "a"] and not stops.finished  # half of it, in both rows
    assert stops.add(["b", "x"]) == ["b", "x"]  # row 0 completes it across two steps; row 1 broke it
    assert stops.done == [True, False] and not stops.finished
    assert stops.add(["a", "a"]) == ["", "a"]  # a stopped row shows nothing more
    assert stops.add(["b", "b"]) == ["", "b"] and stops.finished
    never = StopMatcher(None, rows=1)
    assert [never.add(["a"]) for _ in range(3)] == [["a"]] * 3 and not never.finished


def test_a_stop_string_in_the_prime_does_not_stop_the_sample():
    model, vocab = tiny_model("ab")
    with torch.no_grad():  # always "a": only generated characters count, so "aa" must be generated afresh
        model.decoder.bias.copy_(torch.tensor([10.0, -10.0]))
        model.decoder.weight.zero_()
    assert sample_text(model, vocab, "baa", SampleConfig(length=100, stop="aa", seed=0)) == ["baaaa"]
    assert sample_text(model, vocab, "ba", SampleConfig(length=100, stop="aa", seed=0)) == ["baaa"]


def test_the_command_line_samples_what_the_library_samples_stop_included(runner, trained_run):
    from charlm.runs import load_model
    from conftest import invoke

    _, model, vocab, _ = load_model(trained_run, "cpu")
    for args, cfg in ((["--num-samples", "3", "--json"], dict(num_samples=3)), ([], {})):
        want = sample_text(model, vocab, "the ", SampleConfig(length=150, seed=5, stop="fox", **cfg))
        assert any(len(s) < len("the ") + 150 for s in want)  # the stop string did end a sample early
        got = invoke(runner, "sample", "-c", trained_run, "--prime", "the ", "-n", "150", "--seed", "5",
                     "--stop", "fox", *args)
        assert got.exit_code == 0, got.stderr
        assert (json.loads(got.stdout)["samples"] if args else [got.stdout.removesuffix("\n")]) == want


def test_a_prime_is_read_as_the_start_of_a_line(tmp_path):
    """Every sample starts where training streams and validation rows do: after the text's line break. Here
    an "x" that begins a line is always followed by "y", and the three in an average line by "z": primed with
    "x", the model mostly continues as a line's start does (152 of these 200 samples). Read from the bare
    zero state, the prime had no place, and 1 of 200 did."""
    from charlm.corpus import decode_corpus, split_train_val
    from charlm.train import TrainConfig, Trainer

    rng = random.Random(0)
    text = "".join("xy" + "".join(rng.choice(["xz", "xz", "ab", "cd"]) for _ in range(rng.randint(3, 8))) + "\n"
                   for _ in range(600))
    corpus = decode_corpus(text.encode(), "t.txt")
    train_ids, val_ids = split_train_val(corpus.ids, 0.1)
    torch.manual_seed(0)
    model = CharRNN(ModelConfig(vocab_size=corpus.vocab.size, hidden=32, layers=1))
    config = TrainConfig(batch_size=16, seq_len=32, max_steps=400, eval_every=400, lr=1e-2, precision="fp32")
    meta = {"model_config": model.config.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
    Trainer(model, train_ids, val_ids, config, tmp_path / "run", torch.device("cpu"), meta).run()
    texts = sample_text(model, corpus.vocab, "x", SampleConfig(length=1, num_samples=200, seed=0))
    assert sum(t == "xy" for t in texts) >= 120, sum(t == "xy" for t in texts)


def payload_for(model, vocab):
    return {"model_config": model.config.to_dict(), "vocab": vocab.chars, "model": model.state_dict(),
            "step": 3, "metrics": [{"step": 3, "val_loss": 1.0}]}


def test_checkpoint_round_trips_with_weights_only(tmp_path):
    model, vocab = tiny_model()
    ckpt.save(payload_for(model, vocab), tmp_path / "best.pt")
    raw = torch.load(tmp_path / "best.pt", weights_only=True)  # plain data: the strict loader accepts it
    assert raw["format"] == ckpt.FORMAT and raw["vocab"] == vocab.chars
    loaded = ckpt.load(tmp_path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_failed_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, vocab = tiny_model()
    ckpt.save(payload_for(model, vocab), tmp_path / "last.pt")
    before = (tmp_path / "last.pt").read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CharlmError, match="No space left"):
        ckpt.save(payload_for(model, vocab), tmp_path / "last.pt")
    assert (tmp_path / "last.pt").read_bytes() == before
    assert os.listdir(tmp_path) == ["last.pt"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_code_executing_checkpoint_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"format": 1, "model": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(CharlmError, match="run code"):
        ckpt.load(tmp_path / "evil.pt")
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("content,message", [
    (b"", "truncated or corrupt"),
    # seeded: every pytest-xdist worker must collect the same parameters
    (random.Random(0).randbytes(4096), "not a charlm checkpoint|truncated or corrupt"),
], ids=["empty", "random-bytes"])
def test_corrupt_files_are_refused(tmp_path, content, message):
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CharlmError, match=message):
        ckpt.load(tmp_path / "x.pt")


def test_truncated_checkpoint_is_refused(tmp_path):
    model, vocab = tiny_model()
    ckpt.save(payload_for(model, vocab), tmp_path / "best.pt")
    data = (tmp_path / "best.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CharlmError, match="truncated or corrupt|not a charlm"):
        ckpt.load(tmp_path / "cut.pt")


def test_newer_format_names_the_version(tmp_path):
    torch.save({"format": 99, "model": {}, "charlm_version": "9.0"}, tmp_path / "new.pt")
    with pytest.raises(CharlmError, match="format 99.*reads format <= 1"):
        ckpt.load(tmp_path / "new.pt")


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(CharlmError, match="not a charlm checkpoint"):
        ckpt.load(tmp_path / "other.pt")


def test_missing_paths(tmp_path):
    with pytest.raises(CharlmError, match="no such checkpoint"):
        ckpt.load(tmp_path / "nope.pt")
    with pytest.raises(CharlmError, match="holds no checkpoint"):
        ckpt.load(tmp_path)
    with pytest.raises(CharlmError, match="no trained model"):
        ckpt.latest_run(tmp_path / "checkpoints")


def test_wrapper_prefixes_are_stripped():
    assert list(ckpt.clean_state_dict({"module._orig_mod.rnn.w": 1})) == ["rnn.w"]


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1.1e-308])
def test_a_vanishing_temperature_picks_the_most_likely(temperature):
    """logits / T overflows (or T rounds to 0 in fp32): still a valid draw, the top character, no NaN."""
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]]).repeat(4, 1)
    assert pick(logits, SampleConfig(temperature=temperature), torch.Generator().manual_seed(0)).tolist() == [1] * 4


def test_a_vanishing_top_p_keeps_the_most_likely():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]]).repeat(4, 1)
    picked = pick(logits, SampleConfig(top_p=1.1e-308), torch.Generator().manual_seed(0))
    assert picked.tolist() == [1] * 4


def test_a_checkpoint_gets_a_plain_files_permissions_and_no_temporary_file_is_left(tmp_path):
    mask = os.umask(0)
    os.umask(mask)
    ckpt.save({"format": ckpt.FORMAT, "step": 1}, tmp_path / "a.pt")
    ckpt.save({"format": ckpt.FORMAT, "step": 2}, tmp_path / "a.pt")  # replaced in place
    assert stat.S_IMODE(os.stat(tmp_path / "a.pt").st_mode) == 0o666 & ~mask  # not mkstemp's 0600
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]
    assert torch.load(tmp_path / "a.pt", weights_only=True)["step"] == 2


def test_every_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """files.replacing, which checkpoints, metrics, exports, pages and fetched corpora all write through: an
    error half-way leaves the previous content and no temporary file; success replaces it whole."""
    from charlm.files import replacing, write_atomic

    target = tmp_path / "page.html"
    write_atomic(target, "old")
    with pytest.raises(OSError):
        with replacing(target) as tmp:
            tmp.write_text("half of the new", encoding="utf-8")
            raise OSError(28, "No space left on device")
    assert target.read_text(encoding="utf-8") == "old" and os.listdir(tmp_path) == ["page.html"]
    write_atomic(target, "new ✓".encode("utf-8"))
    assert target.read_text(encoding="utf-8") == "new ✓" and os.listdir(tmp_path) == ["page.html"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # a plain file's mode, not mkstemp's private 0600
