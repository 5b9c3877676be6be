"""Corpora of any size: the streaming, memory-mapped data path, bounded evaluation, folders and several
files, novelty at scale, and failures under torchrun."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import charlm.corpus as corpus_mod
from charlm.corpus import decode_corpus, load_corpus
from charlm.errors import CharlmError
from charlm.novelty import longest_copies
from charlm.streams import eval_streams, make_streams
from conftest import TINY, run_cli, torchrun, word_text

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dense_layout(ids: np.ndarray, rows: int, burn_in: int):
    """The layout as a dense (rows, W+1) matrix, the way it was first specified: row b holds its warm-up
    and its stream, zero-padded; targets outside [lo, hi) are ignored."""
    pairs = len(ids) - 1
    rows = max(1, min(rows, pairs))
    starts = np.arange(rows + 1) * pairs // rows
    warm = np.minimum(starts[:-1], burn_in)
    begin = starts[:-1] - warm
    lengths = starts[1:] - begin
    data = np.zeros((rows, int(lengths.max()) + 1), dtype=np.int64)
    for b in range(rows):
        data[b, : lengths[b] + 1] = ids[begin[b] : begin[b] + lengths[b] + 1]
    return data, warm, lengths


@FAST
@given(n=st.integers(2, 300), rows=st.integers(1, 40), seq_len=st.integers(1, 40), burn=st.integers(0, 12))
def test_mapped_streams_give_the_dense_layouts_batches(n, rows, seq_len, burn):
    ids = (np.arange(n) * 7 % 251).astype(np.uint8)
    streams = make_streams(ids, rows, burn_in=burn)
    data, lo, hi = dense_layout(ids, rows, burn)
    assert streams.num_chunks(seq_len) == -(-(data.shape[1] - 1) // seq_len)
    for k in range(streams.num_chunks(seq_len)):
        x, y = streams.chunk(k, seq_len)
        a = k * seq_len
        b = a + x.shape[1]
        assert np.array_equal(x.numpy(), data[:, a:b])
        want = data[:, a + 1 : b + 1].copy()
        cols = np.arange(a, b)[None, :]
        want[(cols < lo[:, None]) | (cols >= hi[:, None])] = -1
        assert np.array_equal(y.numpy(), want)


def test_a_process_reads_only_its_rows_of_the_map(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text(word_text(400), encoding="utf-8")
    corpus = load_corpus(path, cache_dir=tmp_path / "cache")
    assert isinstance(corpus.ids, np.memmap)  # the ids live on disk, not in the process
    streams = make_streams(corpus.ids, 8)
    mine = streams.select(slice(2, 4))
    x_all, _ = streams.chunk(3, 16)
    x_mine, _ = mine.chunk(3, 16)
    assert np.array_equal(x_mine.numpy(), x_all.numpy()[2:4])
    assert mine.num_chunks(16) == streams.num_chunks(16)  # every process walks the same chunks


def test_streaming_decoder_matches_whole_text_whatever_the_piece_size(tmp_path, monkeypatch):
    text = "héllo wörld\r\n한국어 텍스트 😀\r\n" * 50 + "tail\r"
    path = tmp_path / "u.txt"
    path.write_bytes(text.encode("utf-8"))
    whole = decode_corpus(text.encode("utf-8"), "u.txt")
    for piece in (1, 2, 3, 7, 64):  # pieces that split multi-byte characters and CRLF pairs
        monkeypatch.setattr(corpus_mod, "_PIECE_BYTES", piece)
        small = load_corpus(path)
        assert small.vocab == whole.vocab and np.array_equal(np.asarray(small.ids), whole.ids), piece
        assert small.crlf_converted == text.count("\r\n")
    assert whole.vocab.decode(whole.ids) == text.replace("\r\n", "\n")


def test_bad_byte_offset_is_exact_across_pieces(tmp_path, monkeypatch):
    raw = "ab€cd".encode("utf-8") * 10 + b"\xff" + b"tail"
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    monkeypatch.setattr(corpus_mod, "_PIECE_BYTES", 5)
    at = raw.index(b"\xff")
    with pytest.raises(CharlmError, match=f"bad.txt: not valid utf-8 at byte offset {at} "):
        load_corpus(path)


def test_id_width_follows_the_vocabulary(tmp_path):
    wide = "".join(chr(0x4E00 + i) for i in range(300))  # 300 distinct CJK characters
    path = tmp_path / "cjk.txt"
    path.write_text(wide * 3, encoding="utf-8")
    corpus = load_corpus(path, cache_dir=tmp_path / "cache")
    assert corpus.ids.dtype == np.uint16 and corpus.vocab.size == 300
    assert corpus.vocab.decode(corpus.ids) == wide * 3
    (cached,) = (tmp_path / "cache").glob("ids-*.bin")
    assert cached.stat().st_size == 2 * 900


def test_evaluation_slice_is_fixed_bounded_and_spread():
    ids = np.arange(100_000) % 200
    a = eval_streams(ids.astype(np.uint8), 16, burn_in=32, max_chars=4096)
    b = eval_streams(ids.astype(np.uint8), 16, burn_in=32, max_chars=4096)
    assert np.array_equal(a.begin, b.begin) and np.array_equal(a.length, b.length)
    assert a.scored() == 4096
    first = a.begin + a.lo  # where each segment's scored part starts in the text
    assert first[0] == 0 and first[-1] + (a.hi - a.lo)[-1] == len(ids) - 1  # from the first pair to the last
    gaps = np.diff(first)
    assert gaps.min() > 0 and gaps.max() - gaps.min() <= 1  # evenly spread
    full = eval_streams(ids.astype(np.uint8), 16, burn_in=32, max_chars=None)
    assert full.scored() == len(ids) - 1


def test_a_short_validation_text_is_scored_in_rows_that_each_score_their_burn_in():
    ids = (np.arange(2_501) % 50).astype(np.uint8)  # 2,500 pairs: the tail of a 25 KB text
    short = eval_streams(ids, 32, burn_in=256)
    assert short.scored() == 2_500 and ((short.hi - short.lo) >= 256).all()  # every pair once, warmly
    assert short.rows * short.width <= 2 * 2_500  # positions run to score them: 32 rows of 78 ran 10,700
    # one row per process at least (each torchrun process scores its share), and a long text keeps all 32
    assert eval_streams(ids[:601], 32, burn_in=256, min_rows=4).rows == 4
    assert eval_streams(np.zeros(100_001, np.uint8), 32, burn_in=256).rows == 32
    # a sample keeps its segments: its standard error compares them (`charlm eval --max-chars`)
    assert eval_streams(np.zeros(100_001, np.uint8), 64, burn_in=256, max_chars=2_000).rows == 64


def write_folder(root, files: dict):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_folder_is_its_files_in_sorted_order_joined_by_a_blank_line(tmp_path):
    docs = tmp_path / "docs"
    write_folder(docs, {"b.txt": "second", "a.txt": "first", "sub/c.txt": "third", ".hidden/x.txt": "skip"})
    corpus = load_corpus(docs)
    assert corpus.vocab.decode(corpus.ids) == "first\n\nsecond\n\nthird"
    assert [os.path.basename(f["path"]) for f in corpus.files] == ["a.txt", "b.txt", "c.txt"]
    several = load_corpus([docs / "sub" / "c.txt", docs / "a.txt"])  # given out of order: sorted
    assert several.vocab.decode(several.ids) == "first\n\nthird"
    globbed = load_corpus([str(docs / "*.txt")])
    assert globbed.vocab.decode(globbed.ids) == "first\n\nsecond"
    one = load_corpus(docs / "a.txt")
    assert one.sha256 != corpus.sha256 != several.sha256


def test_a_bad_file_in_a_folder_is_named(tmp_path):
    docs = tmp_path / "docs"
    write_folder(docs, {"a.txt": "fine text"})
    (docs / "z.bin").write_bytes(b"PK\x03\x04\x00\x00")
    with pytest.raises(CharlmError, match="z.bin: looks binary"):
        load_corpus(docs)
    with pytest.raises(CharlmError, match="no file matches"):
        load_corpus([str(tmp_path / "nothing*.txt")])


def test_train_on_a_folder_then_resume_refuses_a_changed_set(tmp_path):
    docs = tmp_path / "docs"
    write_folder(docs, {"a.txt": word_text(200, seed=1), "b.txt": word_text(200, seed=2)})
    # relative paths: an absolute temporary path can be long enough for the 80-column summary to shorten it
    args = ["train", "docs", "--out", "run", "--max-steps", "4", "--eval-every", "2", *TINY]
    first = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "docs: " in first.stderr and "characters" in first.stderr
    saved = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert saved["val_chars"] > 0
    (docs / "c.txt").write_text("one more file\n", encoding="utf-8")
    resumed = run_cli(*args[:-len(TINY)], *TINY, "--resume", cwd=tmp_path)
    assert resumed.returncode == 1
    assert "not the ones this run was trained on" in resumed.stderr
    assert "Traceback" not in resumed.stderr


def test_periodic_evaluations_read_a_sample_and_the_final_report_reads_everything(tmp_path, words_file):
    out = tmp_path / "run"
    result = run_cli("train", words_file, "--out", out, "--max-steps", "6", "--eval-every", "3",
                     "--eval-chars", "1000", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_chars"] for r in records] == [1000, 1000]
    assert "val " in result.stderr and "/1.0k" in result.stderr  # the line says how many it scored
    val_chars = int(result.stderr.split(" validation)")[0].rsplit("train, ", 1)[1].replace(",", ""))
    assert f"on all {val_chars - 1:,} validation characters" in result.stderr


@FAST
@given(corpus=st.text(alphabet="abc", min_size=1, max_size=200),
       samples=st.lists(st.text(alphabet="abcd", max_size=40), min_size=1, max_size=3))
def test_longest_copy_is_the_longest_substring_found(corpus, samples):
    def ids(text):
        return np.frombuffer(text.encode("ascii"), dtype=np.uint8)

    found = longest_copies(ids(corpus), [ids(s) for s in samples])
    for s, (start, length) in zip(samples, found):
        assert s[start : start + length] in corpus
        assert not any(s[i : i + length + 1] in corpus for i in range(len(s) - length))  # none longer


def test_novelty_through_the_cli_finds_a_copied_line(tmp_path):
    docs = tmp_path / "docs"
    write_folder(docs, {"a.txt": "hello there\n" * 300, "b.txt": "general kenobi\n" * 300})
    out = tmp_path / "run"
    trained = run_cli("train", docs, "--out", out, "--max-steps", "60", "--eval-every", "30", "--lr", "1e-2",
                      *TINY, cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = run_cli("sample", "-c", out, "--prime", "general", "-n", "40", "--greedy", "--novelty", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("novelty:"))
    copied = int(line.split(": ", 1)[1].split(" of ")[0].rsplit(" ", 1)[1])
    generated = result.stdout[len("general"):].rstrip("\n")
    assert copied >= 10 and copied <= len(generated)


@pytest.mark.slow
def test_an_error_on_one_rank_ends_every_rank_with_its_message(tmp_path, words_file):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the run directory should go")
    began = time.monotonic()
    result = torchrun("train", words_file, "--out", blocker / "run", "--max-steps", "5", *TINY, cwd=tmp_path,
                      timeout=120)
    assert result.returncode != 0
    assert time.monotonic() - began < 60  # not a collective's 30-minute timeout
    lines = [x for x in result.stderr.splitlines() if "error:" in x and "cannot write to" in x]
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr[-2000:]  # both ranks, the same line
