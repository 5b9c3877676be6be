"""Long passes say what they are doing: the corpus build on first use (and only the hash once it is cached),
`charlm score --summary` on a large file, `charlm sample --novelty` on a large corpus."""

from __future__ import annotations

import io
import json

import numpy as np

from charlm.cli.train_report import CorpusProgress

from conftest import TINY, invoke


def test_a_large_corpus_build_announces_each_pass_and_a_cached_one_only_its_hash(runner, words_file, tmp_path,
                                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(CorpusProgress, "ANNOUNCE_BYTES", 1000)  # as a corpus of hundreds of MB would
    first = invoke(runner, "train", words_file, "--out", tmp_path / "a", "--max-steps", "1", "--no-items", *TINY)
    assert first.exit_code == 0, first.stderr
    lines = [line for line in first.stderr.splitlines() if line.startswith("corpus:")]
    assert [line.split(",")[0] for line in lines] == ["corpus: hashing", "corpus: reading for its vocabulary",
                                                      "corpus: encoding into the cache (once: later runs map it)"]
    again = invoke(runner, "train", words_file, "--out", tmp_path / "b", "--max-steps", "1", "--no-items", *TINY)
    assert [line.split(",")[0] for line in again.stderr.splitlines() if line.startswith("corpus:")] == \
        ["corpus: hashing"]
    monkeypatch.setattr(CorpusProgress, "ANNOUNCE_BYTES", 10**12)  # a small corpus says nothing
    quiet = invoke(runner, "train", words_file, "--out", tmp_path / "c", "--max-steps", "1", "--no-items", *TINY)
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("corpus:")]


def _held_out(tmp_path):
    from conftest import word_text

    text = tmp_path / "held_out.txt"
    text.write_text(word_text(2000, seed=11), encoding="utf-8")
    return text


def test_score_summary_of_a_large_file_says_what_it_scores_on_stderr_only(runner, trained_run, tmp_path, monkeypatch):
    from charlm.cli import display

    text = _held_out(tmp_path)
    size = text.stat().st_size
    monkeypatch.setattr(display, "ANNOUNCE_CHARS", 1000)  # as a file of hundreds of MB would
    piped = invoke(runner, "score", text, "-c", trained_run, "--summary", "--json")
    assert piped.exit_code == 0, piped.stderr
    assert f"scoring: {size:,} bytes" in piped.stderr.splitlines()  # the permanent line a piped pass prints
    assert json.loads(piped.stdout)["chars"] > 0  # stdout stays the summary alone
    lines = invoke(runner, "score", text, "-c", trained_run)  # per-character output is its own progress
    assert lines.exit_code == 0 and "scoring:" not in lines.stderr
    monkeypatch.setattr(display, "ANNOUNCE_CHARS", 10**12)  # a short pass says nothing
    quiet = invoke(runner, "score", text, "-c", trained_run, "--summary", "--json")
    assert quiet.exit_code == 0 and "scoring:" not in quiet.stderr


def test_score_summary_on_a_terminal_draws_a_bar_that_reaches_the_end(runner, trained_run, tmp_path, monkeypatch):
    import importlib

    from rich.console import Console

    from charlm.cli import display

    commands = importlib.import_module("charlm.cli.app")  # the module (charlm.cli.app is also the Typer app)
    screen = io.StringIO()
    monkeypatch.setattr(commands, "err", Console(file=screen, force_terminal=True, width=100))
    monkeypatch.setattr(display, "ANNOUNCE_CHARS", 1000)
    result = invoke(runner, "score", _held_out(tmp_path), "-c", trained_run, "--summary")
    assert result.exit_code == 0, screen.getvalue()
    drawn = screen.getvalue()
    assert "scoring" in drawn and "100%" in drawn  # the bar's last frame: the whole file was read and scored


def test_sample_novelty_on_a_large_corpus_says_it_is_searching_it(runner, trained_run, monkeypatch):
    from charlm.cli import display
    from charlm.runs import load_model, training_corpus

    payload = load_model(trained_run, "cpu")[0]
    chars = len(training_corpus(payload).ids)
    monkeypatch.setattr(display, "ANNOUNCE_CHARS", 1000)  # as a corpus of hundreds of MB would
    result = invoke(runner, "sample", "-c", trained_run, "-n", "80", "--seed", "1", "--novelty")
    assert result.exit_code == 0, result.stderr
    err = result.stderr.splitlines()
    assert err.index(f"novelty: searching words.txt: {chars:,} characters") < \
        [i for i, line in enumerate(err) if "longest run found verbatim" in line][0]
    assert "searching" not in result.stdout
    monkeypatch.setattr(display, "ANNOUNCE_CHARS", 10**12)
    quiet = invoke(runner, "sample", "-c", trained_run, "-n", "80", "--seed", "1", "--novelty")
    assert quiet.exit_code == 0 and "searching" not in quiet.stderr


def test_novelty_progress_counts_every_scan_of_the_corpus_to_its_end(monkeypatch):
    from charlm import novelty

    monkeypatch.setattr(novelty, "_CHUNK", 1000)  # several chunks from a small corpus
    corpus = np.random.default_rng(0).integers(0, 4, 10_500).astype(np.uint8)
    seen = []
    found = novelty.longest_copies(corpus, [corpus[200:260]], progress=lambda done, total: seen.append((done, total)))
    assert found == [(0, 60)]
    assert seen[-1] == (len(corpus), len(corpus)) and len(seen) == 11
    assert all(a[0] < b[0] for a, b in zip(seen, seen[1:]))
    # a sample with no 8-character stretch in the corpus needs more scans: each adds the corpus to the total
    seen.clear()
    novelty.longest_copies(corpus, [np.array([5, 5, 5, 5, 5, 5, 5, 5, 0, 1], dtype=np.uint8)],
                           progress=lambda done, total: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and seen[-1][1] > len(corpus) and seen[-1][1] % len(corpus) == 0
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(seen, seen[1:]))
