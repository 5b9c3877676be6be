"""The paths a user takes that the other tests never walked: resuming across precisions and devices, the
sampling device choice, every stop limit, every optimizer, and the CLI's data options."""

import json
import re

import numpy as np
import pytest
import torch

from charlm import checkpoint as ckpt
from charlm import state as st
from charlm.corpus import load_corpus
from charlm.model import CharRNN, ModelConfig
from charlm.runtime import sampling_device

from conftest import TINY, invoke, run_cli, word_text

# every test here passes the model size, layout and evaluation cadence: the defaults are chosen per corpus
SMALL = [*TINY, "--precision", "fp32", "--eval-every", "5"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def states(payload):
    return payload["carried_state"]


# ------------------------------------------------------------------------------------------ precision and device
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_carried_state_stays_fp32_under_bf16_autocast(cell):
    model = CharRNN(ModelConfig(vocab_size=7, cell=cell, hidden=8, layers=2))
    ids = torch.randint(0, 7, (2, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = model(ids, model.init_state(2))
    assert all(t.dtype == torch.float32 for t in (state if isinstance(state, tuple) else (state,)))
    logits, _ = model(ids, state)  # an fp32 pass takes it (oneDNN's LSTM refuses a bf16 state)
    assert logits.dtype == torch.float32


def test_a_saved_state_loads_as_fp32_whatever_it_was_saved_in():
    saved = [torch.randn(2, 3, 4).to(torch.bfloat16), torch.randn(2, 3, 4).half()]
    h, c = st.from_list(saved, "cpu")
    assert h.dtype == c.dtype == torch.float32
    assert torch.equal(h, saved[0].float()) and torch.equal(c, saved[1].float())


@pytest.mark.parametrize("first,then", [("bf16", "fp32"), ("fp32", "bf16")])
def test_lstm_run_resumes_under_the_other_precision(runner, words_file, tmp_path, first, then):
    run = tmp_path / "run"
    args = ["train", words_file, "--out", run, "--cell", "lstm", "--eval-every", "5", *TINY]
    started = invoke(runner, *args, "--precision", first, "--max-steps", "10")
    assert started.exit_code == 0, started.output
    assert all(t.dtype == torch.float32 for t in states(torch.load(run / "last.pt", weights_only=True)))
    resumed = invoke(runner, *args, "--precision", then, "--max-steps", "20", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 20


def test_a_gpu_checkpoint_with_a_half_state_resumes_on_the_cpu(runner, words_file, tmp_path):
    """What an fp16-autocast CUDA run saved before the state was kept in fp32: an fp16 state, a CUDA RNG."""
    run = tmp_path / "run"
    args = ["train", words_file, "--out", run, "--cell", "lstm", *SMALL]
    assert invoke(runner, *args, "--max-steps", "5").exit_code == 0
    payload = torch.load(run / "last.pt", weights_only=True)
    payload["carried_state"] = [t.half() for t in payload["carried_state"]]
    payload["rng"]["cuda"] = torch.zeros(16, dtype=torch.uint8)
    ckpt.save(payload, run / "last.pt")
    resumed = invoke(runner, *args, "--max-steps", "10", "--resume", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 10


def test_single_sample_on_cuda_runs_on_the_cpu_unless_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    small, large = 2_500_000, 25_000_000  # the default 2 x 512 GRU; the 3 x 1024 LSTM of bench/gpu.sh
    device, note = sampling_device("auto", 1, small)
    assert device.type == "cpu" and "--device cuda" in note
    assert sampling_device("auto", 8, small) == (torch.device("cuda"), None)  # a batch stays on the GPU
    assert sampling_device("cuda", 1, small) == (torch.device("cuda"), None)  # asked for: obeyed
    assert sampling_device("auto", 1, large) == (torch.device("cuda"), None)  # the CPU's bandwidth loses
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sampling_device("auto", 1, small) == (torch.device("cpu"), None)  # no note where nothing changed


def test_sample_command_says_when_it_moves_one_sample_to_the_cpu(runner, trained_run, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = invoke(runner, "sample", "-c", trained_run, "--prime", "the", "-n", "10", "--seed", "1",
                    "--device", "auto")  # the auto choice is what this checks (the suite pins the CPU otherwise)
    assert result.exit_code == 0 and result.stdout.startswith("the") and len(result.stdout) == 14
    assert len(result.stderr.strip().splitlines()) == 1 and "runs on the CPU" in result.stderr


# ------------------------------------------------------------------------------------------ stop limits
def test_max_time_stops_the_run(runner, words_file, tmp_path):
    # --patience 0: a fast machine evaluates this small text often enough in 3 s for the early end to come first
    result = invoke(runner, "train", words_file, "--out", tmp_path / "run", "--max-time", "3s", "--patience", "0",
                    *SMALL)
    assert result.exit_code == 0, result.output
    assert "stopped: reached --max-time" in result.stderr
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert payload["elapsed_s"] < 60  # it stopped by itself, soon after the limit (a busy machine may take a while)


def test_epochs_stop_after_one_pass(runner, tmp_path):
    corpus = tmp_path / "short.txt"
    corpus.write_text(word_text(250), encoding="utf-8")  # ~10k characters: about 20 steps per epoch
    result = invoke(runner, "train", corpus, "--out", tmp_path / "run", "--epochs", "1", "--eval-every", "1000",
                    *TINY, "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "stopped: reached --epochs" in result.stderr
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    # one pass predicts every training character once: chars seen = the training text minus its first
    train_chars = int(re.search(r"([\d,]+) train", result.stderr).group(1).replace(",", ""))
    assert payload["epoch"] == 1 and payload["chars_seen"] == train_chars - 1


def test_patience_ends_a_run_that_no_longer_improves_after_a_cooldown(runner, words_file, tmp_path):
    # an update of 1e-30 leaves fp32 weights as they are: the validation loss never improves after the first
    result = invoke(runner, "train", words_file, "--out", tmp_path / "run", "--lr", "1e-30", "--patience", "2",
                    "--max-steps", "100", *SMALL)
    assert result.exit_code == 0, result.output
    # two evaluations after the best (step 5) the run goes back to it and cools down over the 10 steps a cooldown
    # lasts at least, then ends, far short of --max-steps
    assert "no new best in 2 evaluations: back to step 5" in result.stderr
    assert "stopped improving (--patience 2) and cooled down from the best over 10 steps, ending at step 25" \
        in result.stderr
    # every 5 steps, and at each quarter of the 10-step cooldown (steps 2, 5 and 7 of it), where the best may come
    assert [m["step"] for m in metrics(tmp_path / "run")] == [5, 10, 15, 17, 20, 22, 25]
    # a longer budget would not help: the note says what would, and how to train on regardless
    assert "train longer" not in result.stderr
    train_on = result.stderr[result.stderr.index("train on"):]
    assert "--patience 0" in train_on and "--patience 2" not in train_on and "--resume" in train_on


# ------------------------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("optimizer,lr", [("adam", "1e-2"), ("rmsprop", "3e-3"), ("sgd", "1.0")])
def test_each_optimizer_learns(runner, words_file, tmp_path, optimizer, lr):
    run = tmp_path / optimizer
    result = invoke(runner, "train", words_file, "--out", run, "--optimizer", optimizer, "--lr", lr,
                    "--max-steps", "60", "--warmup", "5", "--dropout", "0", *TINY, "--precision", "fp32",
                    "--eval-every", "10")
    assert result.exit_code == 0, result.output
    vocab = len(set(words_file.read_text()))
    first, last = metrics(run)[0]["val_loss"], metrics(run)[-1]["val_loss"]
    assert last < first - 0.1 and last < 0.9 * np.log(vocab), (first, last)


# ------------------------------------------------------------------------------------------ data options
def test_keep_crlf_and_encoding_through_the_cli(runner, tmp_path):
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(word_text(200).replace("\n", "\r\n").encode())
    kept = invoke(runner, "train", crlf, "--out", tmp_path / "kept", "--keep-crlf", "--max-steps", "2", *SMALL)
    assert kept.exit_code == 0, kept.output
    assert "\r" in torch.load(tmp_path / "kept" / "last.pt", weights_only=True)["vocab"]
    latin = tmp_path / "latin.txt"
    latin.write_bytes(("café crème déjà vu\n" * 300).encode("latin-1"))
    refused = invoke(runner, "train", latin, "--out", tmp_path / "utf8", "--max-steps", "2", *SMALL)
    assert refused.exit_code == 1 and "byte offset 3" in refused.stderr
    read = invoke(runner, "train", latin, "--out", tmp_path / "latin", "--encoding", "latin-1", "--max-steps", "2",
                  *SMALL)
    assert read.exit_code == 0, read.output
    assert set("éè") <= set(torch.load(tmp_path / "latin" / "last.pt", weights_only=True)["vocab"])


def test_eval_unknown_skip_scores_only_known_characters(runner, trained_run, tmp_path):
    text = tmp_path / "mixed.txt"
    text.write_text("the quick fox QZ jumps over the lazy dog\n" * 5, encoding="utf-8")
    refused = invoke(runner, "eval", text, "-c", trained_run)
    assert refused.exit_code == 1 and "Q Z" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    skipped = invoke(runner, "eval", text, "-c", trained_run, "--unknown", "skip", "--json")
    assert skipped.exit_code == 0, skipped.output
    known = len(text.read_text()) - text.read_text().count("Q") - text.read_text().count("Z")
    assert json.loads(skipped.stdout)["chars"] == known - 1  # the first character is never predicted


def test_prime_file_leads_the_sample(runner, trained_run, tmp_path):
    prime = tmp_path / "prime.txt"
    prime.write_text("the lazy dog\n", encoding="utf-8")
    result = invoke(runner, "sample", "-c", trained_run, "--prime-file", prime, "-n", "20", "--seed", "1")
    assert result.exit_code == 0 and result.stdout.startswith("the lazy dog\n")
    assert len(result.stdout) == len("the lazy dog\n") + 20 + 1
    prime.write_bytes(b"the \xff dog")
    bad = invoke(runner, "sample", "-c", trained_run, "--prime-file", prime)
    assert bad.exit_code == 1 and "byte offset 4" in bad.stderr and bad.stdout == ""


def test_separator_goes_between_samples(runner, trained_run):
    result = invoke(runner, "sample", "-c", trained_run, "--prime", "the", "-n", "12", "--num-samples", "3",
                    "--seed", "1", "--separator", "\n=====\n")
    assert result.exit_code == 0
    parts = result.stdout.rstrip("\n").split("\n=====\n")
    assert len(parts) == 3 and all(p.startswith("the") and len(p) == 15 for p in parts)


def test_corpora_lists_every_named_corpus(runner):
    from charlm.datasets import NAMES

    result = invoke(runner, "corpora")
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.stdout.strip().splitlines()]
    assert listed == list(NAMES) and {"python-stdlib", "tinyshakespeare"} <= set(listed)


@pytest.mark.slow
def test_named_corpus_trains_through_the_cli(tmp_path):
    result = run_cli("train", "--corpus", "python-stdlib", "--max-steps", "3", "--eval-every", "3",
                     "--val-frac", "0.01", *TINY, "--precision", "fp32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    built = tmp_path / "data" / "python-stdlib.txt"
    assert built.is_file() and b"def " in built.read_bytes()[:200_000]
    payload = torch.load(tmp_path / "checkpoints" / "python-stdlib" / "last.pt", weights_only=True)
    assert payload["step"] == 3 and "(" in payload["vocab"]


# ------------------------------------------------------------------------------------------ corpus cache
def test_second_load_reads_the_cache(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("some text, with ünïcode\n" * 100, encoding="utf-8")
    cache = tmp_path / "cache"
    first = load_corpus(path, cache_dir=cache)
    # Mark the cached ids: the last character (a line break) becomes an "s" there, and only there.
    data = max((f for f in cache.iterdir() if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data.read_bytes())
    width = first.ids.dtype.itemsize
    assert len(raw) == len(first.ids) * width  # the cache holds the ids as they are
    raw[-width:] = np.array([first.vocab.encode("s")[0]], dtype=first.ids.dtype).tobytes()
    data.write_bytes(bytes(raw))
    second = load_corpus(path, cache_dir=cache)
    assert second.vocab.decode(second.ids[-1:]) == "s"
    assert np.array_equal(second.ids[:-1], first.ids[:-1])
    path.write_text("different text\n" * 100, encoding="utf-8")  # a new hash: decoded afresh
    third = load_corpus(path, cache_dir=cache)
    assert third.vocab.decode(third.ids).startswith("different") and third.vocab.decode(third.ids[-1:]) == "\n"
