"""Vocabulary and corpus: any UTF-8 text in, ids out; the stream layout covers every character once."""

import numpy as np
import pytest

from charlm.corpus import decode_corpus, load_corpus, split_train_val
from charlm.streams import fit_layout, make_streams
from charlm.errors import CharlmError
from charlm.vocab import Vocabulary


def test_vocabulary_is_sorted_code_points_and_round_trips():
    text = "héllo wörld 안녕하세요 🙂\n"
    corpus = decode_corpus(text.encode("utf-8"), "t.txt")
    assert corpus.vocab.chars == "".join(sorted(set(text)))
    assert corpus.vocab.decode(corpus.ids) == text
    assert np.array_equal(corpus.vocab.encode(text), corpus.ids.astype(np.int64))


def test_ascii_and_general_paths_agree():
    text = "abc\nxyz  q\n" * 50
    fast = decode_corpus(text.encode(), "a.txt")
    slow = decode_corpus(text.encode("utf-16"), "a.txt", encoding="utf-16")
    assert fast.vocab == slow.vocab and np.array_equal(fast.ids, slow.ids)


def test_crlf_becomes_lf_unless_kept():
    raw = b"one\r\ntwo\nthree\r\n"
    corpus = decode_corpus(raw, "c.txt")
    assert corpus.vocab.decode(corpus.ids) == "one\ntwo\nthree\n" and corpus.crlf_converted == 2
    kept = decode_corpus(raw, "c.txt", keep_crlf=True)
    assert kept.vocab.decode(kept.ids) == raw.decode()


def test_crlf_split_across_decode_pieces(monkeypatch):
    import charlm.corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "_PIECE_BYTES", 4)
    raw = "é\r\nab\r\n안\r\n".encode()  # non-ASCII: the piecewise path, with CRLFs on piece boundaries
    corpus = decode_corpus(raw, "p.txt")
    assert corpus.vocab.decode(corpus.ids) == "é\nab\n안\n"


def test_invalid_utf8_names_the_byte_offset():
    raw = "fine text ".encode() + b"\xff\xfe" + b" more"
    with pytest.raises(CharlmError, match="byte offset 10"):
        decode_corpus(raw, "bad.txt")
    latin = decode_corpus(raw, "bad.txt", encoding="latin-1")
    assert latin.chars == len(raw)


def test_binary_file_is_refused():
    with pytest.raises(CharlmError, match="binary"):
        decode_corpus(b"PK\x03\x04\x00\x00abc", "x.zip")


def test_unknown_characters_are_named_or_skipped():
    vocab = Vocabulary("abc")
    with pytest.raises(CharlmError, match="x y"):
        decode_corpus(b"abcxy", "u.txt", vocab=vocab)
    skipped = decode_corpus(b"abxcy", "u.txt", vocab=vocab, unknown="skip")
    assert vocab.decode(skipped.ids) == "abc"


def test_cache_is_reused_and_matches(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("some text, with ünïcode\n" * 100, encoding="utf-8")
    first = load_corpus(path, cache_dir=tmp_path / "run")
    cached = list((tmp_path / "run").glob("ids-*.bin"))
    assert len(cached) == 1
    second = load_corpus(path, cache_dir=tmp_path / "run")
    assert second.vocab == first.vocab and np.array_equal(second.ids, first.ids)
    path.write_text("different text\n" * 100, encoding="utf-8")  # a new hash: a new cache entry
    third = load_corpus(path, cache_dir=tmp_path / "run")
    assert third.vocab.decode(third.ids).startswith("different")


@pytest.mark.parametrize("n,rows", [(25, 3), (100, 7), (101, 10), (7, 64), (1000, 64)])
def test_streams_cover_every_target_once(n, rows):
    ids = np.arange(n) % 250
    streams = make_streams(ids.astype(np.uint8), rows)
    seen = []
    for k in range(streams.num_chunks(4)):
        x, y = streams.chunk(k, 4)
        for b in range(streams.rows):
            for j in range(y.shape[1]):
                if y[b, j] >= 0:
                    col = k * 4 + j
                    start = int(np.arange(streams.rows + 1)[b] * (n - 1) // streams.rows)
                    seen.append(start + col + 1)  # the position in ids of this target
                    assert int(x[b, j]) == ids[start + col] and int(y[b, j]) == ids[start + col + 1]
    assert sorted(seen) == list(range(1, n))


def test_row_b_of_chunk_k_plus_1_continues_row_b_of_chunk_k():
    ids = np.arange(240, dtype=np.int32)
    streams = make_streams(ids, 4)
    x0, _ = streams.chunk(0, 10)
    x1, _ = streams.chunk(1, 10)
    assert (x1[:, 0] == x0[:, -1] + 1).all()
    assert x0[:, 0].tolist() == [0, 59, 119, 179]  # stream i starts at i*M//B with M = 239 pairs


def test_burn_in_warms_but_does_not_score():
    ids = np.arange(100, dtype=np.int32)
    streams = make_streams(ids, 4, burn_in=5)
    assert streams.scored() == 99
    assert streams.lo.tolist() == [0, 5, 5, 5]


def test_small_corpus_shrinks_batch_and_chunk():
    assert fit_layout(100_000, 64, 128) == (64, 128)
    assert fit_layout(300, 64, 128) == (2, 128)
    assert fit_layout(50, 64, 128) == (1, 50)


def test_split_keeps_a_validation_tail():
    train, val = split_train_val(np.arange(1000), 0.1)
    assert len(val) == 100 and val[0] == 900
    with pytest.raises(CharlmError, match="at least 4"):
        split_train_val(np.arange(3), 0.1)
