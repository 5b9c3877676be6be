"""Long passes say what they are doing: the corpus build on first use, and only the hash once it is cached."""

from __future__ import annotations

from charlm.cli.train import CorpusProgress

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
