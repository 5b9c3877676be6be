r"""Reading a text file into ids, and laying ids out as the contiguous streams that training walks.

How a corpus becomes batches. The training text (ids) gives M = N-1 (input, target) pairs; they are cut into
B contiguous streams, stream i starting at offset i*M//B, and every stream is walked left to right in
chunks of T columns (truncated backpropagation through time):

    ids:       a b c d e f g h i j k l m n o p q r s t u v w x y      N = 25, M = 24 pairs, B = 3
               |--- stream 0 ---||--- stream 1 ---||--- stream 2 ---|
    row 0:     a b c d e f g h (i)    inputs a..h, targets b..i
    row 1:     i j k l m n o p (q)    each row also holds the character after its last input,
    row 2:     q r s t u v w x (y)    its final target
               \_chunk 0_/\_chunk 1_/ ...   T = 4: chunk k holds columns kT .. kT+T-1

Row b of chunk k+1 continues exactly where row b of chunk k stopped, so the hidden state the model ends
chunk k with is the right state to start chunk k+1 with: that state is carried, detached, from chunk to
chunk (state.py). When B does not divide M the rows differ in length by one; a short row's missing last
target is masked (-1), so one epoch predicts every training character exactly once.

Evaluation uses the same layout over the validation text with a few long streams; every stream but the
first is first warmed on the `burn_in` characters before it (scored by none), so the pass scores like one
unbroken stateful pass while running in parallel.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from charlm.errors import CharlmError
from charlm.vocab import Vocabulary, describe_chars

# Decode this many bytes at a time: big enough that per-piece overhead vanishes, small enough that the
# temporary UTF-32 copy of a piece (4 bytes per character) stays small next to the corpus itself.
_PIECE_BYTES = 1 << 22


@dataclass(frozen=True)
class CorpusText:
    """A decoded corpus: ids under its vocabulary plus what is needed to recognise the file again."""

    ids: np.ndarray  # (N,) uint8 or int32
    vocab: Vocabulary
    path: str
    sha256: str
    crlf_converted: int  # how many CRLF line ends became LF

    @property
    def chars(self) -> int:
        return len(self.ids)

    def info(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "chars": int(len(self.ids))}


def read_bytes(path) -> bytes:
    """The file's bytes, or a CharlmError naming what is wrong with the path."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"{path}: no such file; check the path (named corpora: --corpus python-stdlib)")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; pass a text file")
    try:
        return path.read_bytes()
    except PermissionError:
        raise CharlmError(f"{path}: permission denied; make the file readable (chmod +r) or copy it")
    except OSError as exc:
        raise CharlmError(f"{path}: cannot read ({exc.strerror})")


def _pieces(raw: bytes, encoding: str, path, keep_crlf: bool) -> Iterator[str]:
    """Decode raw in pieces, converting CRLF to LF, naming the byte offset of any undecodable byte."""
    try:
        decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    except LookupError:
        raise CharlmError(f"unknown --encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1")
    held = ""  # a trailing '\r' waits for the next piece, in case that piece starts with '\n'
    view = memoryview(raw)
    for start in range(0, max(len(raw), 1), _PIECE_BYTES):
        pending = len(decoder.getstate()[0])
        final = start + _PIECE_BYTES >= len(raw)
        try:
            text = held + decoder.decode(view[start : start + _PIECE_BYTES], final)
        except UnicodeDecodeError as exc:
            offset = start - pending + exc.start
            raise CharlmError(
                f"{path}: not valid {encoding} at byte offset {offset} (byte 0x{raw[offset]:02x}); "
                "pass --encoding (for example latin-1 or cp1252) if the file uses another encoding"
            )
        held = ""
        if not keep_crlf:
            if text.endswith("\r") and not final:
                text, held = text[:-1], "\r"
            text = text.replace("\r\n", "\n")
        if text:
            yield text


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def decode_corpus(
    raw: bytes,
    path,
    vocab: Optional[Vocabulary] = None,
    encoding: str = "utf-8",
    keep_crlf: bool = False,
    unknown: str = "error",
    sha: Optional[str] = None,
) -> CorpusText:
    """Bytes -> ids. Builds the vocabulary from the text unless one is given (then unknown characters are
    an error naming them). Vectorised throughout: no Python loop runs per character."""
    sha = sha or hashlib.sha256(raw).hexdigest()
    try:
        utf8 = codecs.lookup(encoding).name in ("utf-8", "ascii")
    except LookupError:
        raise CharlmError(f"unknown --encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1")
    if utf8 and b"\x00" in raw:
        at = raw.index(b"\x00")
        raise CharlmError(f"{path}: looks binary (NUL byte at offset {at}); charlm trains on text files")
    crlf = raw.count(b"\r\n") if (utf8 and not keep_crlf) else 0

    if utf8 and raw.isascii():
        # Fast path, most corpora: every byte is one character, so the bytes are the code points.
        data = raw.replace(b"\r\n", b"\n") if crlf else raw
        codes = np.frombuffer(data, dtype=np.uint8)
        if vocab is None:
            counts = np.zeros(256, dtype=np.int64)
            for a in range(0, len(codes), _PIECE_BYTES):  # bincount widens to int64: go piece by piece
                counts += np.bincount(codes[a : a + _PIECE_BYTES], minlength=256)
            present = np.flatnonzero(counts)
            vocab = Vocabulary("".join(map(chr, present)))
        if vocab.size < 255:  # a byte -> id table keeps the whole pass at one byte per character
            table = np.full(256, 255, dtype=np.uint8)
            inside = vocab.codes < 256
            table[vocab.codes[inside]] = np.flatnonzero(inside)
            ids = table[codes]
            if ids.max(initial=0) == 255:  # a reduction: no temporary the size of the corpus
                ids = _known(np.where(ids == 255, -1, ids.astype(np.int32)), codes, path, unknown)
        else:
            ids = _known(vocab.ids_from_codes(codes), codes, path, unknown)
        return CorpusText(ids.astype(vocab.id_dtype(), copy=False), vocab, str(path), sha, crlf)

    # General path, two passes over pieces: (1) count characters and collect the vocabulary, (2) fill ids.
    total, seen = 0, set()
    for text in _pieces(raw, encoding, path, keep_crlf):
        total += len(text)
        if vocab is None:
            seen.update(np.unique(_codes(text)).tolist())
    if vocab is None:
        if not seen:
            raise CharlmError(f"{path} is empty; give a file with some text in it")
        vocab = Vocabulary("".join(map(chr, sorted(seen))))
    ids = np.empty(total, dtype=vocab.id_dtype())
    at = 0
    for text in _pieces(raw, encoding, path, keep_crlf):
        codes = _codes(text)
        piece_ids = _known(vocab.ids_from_codes(codes), codes, path, unknown)
        ids[at : at + len(piece_ids)] = piece_ids
        at += len(piece_ids)
    return CorpusText(ids[:at], vocab, str(path), sha, crlf)


def _known(ids: np.ndarray, codes: np.ndarray, path, unknown: str) -> np.ndarray:
    """ids with unknown characters (-1) dropped (unknown='skip') or refused with their names."""
    bad = ids < 0
    if bad.any() and unknown == "skip":
        return ids[~bad]
    if bad.any():
        missing = [chr(int(c)) for c in np.unique(codes[bad])]
        shown = describe_chars(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise CharlmError(
            f"{path} has {len(missing)} character(s) the model's vocabulary lacks: {shown}; "
            "remove them from the file, or train a new model on it instead of --init-from"
        )
    return ids


def load_corpus(
    path,
    vocab: Optional[Vocabulary] = None,
    encoding: str = "utf-8",
    keep_crlf: bool = False,
    cache_dir=None,
    unknown: str = "error",
) -> CorpusText:
    """Read and encode a corpus. With cache_dir, the ids are kept there as .npy keyed by the file's hash (and
    the vocabulary), so a second run on the same file skips decoding."""
    raw = read_bytes(path)
    if not raw:
        raise CharlmError(f"{path} is empty; give a file with some text in it")
    if cache_dir is None:
        return decode_corpus(raw, path, vocab, encoding, keep_crlf, unknown)
    sha = hashlib.sha256(raw).hexdigest()
    key = hashlib.sha256(f"{sha}|{encoding}|{keep_crlf}|{unknown}|{vocab.chars if vocab else ''}".encode()).hexdigest()
    ids_file = Path(cache_dir) / f"encoded-{key[:16]}.npy"
    meta_file = ids_file.with_suffix(".json")
    if ids_file.is_file() and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            ids = np.load(ids_file, allow_pickle=False)
            return CorpusText(ids, Vocabulary(meta["vocab"]), str(path), sha, int(meta["crlf"]))
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache is rebuilt below
    corpus = decode_corpus(raw, path, vocab, encoding, keep_crlf, unknown, sha)
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = ids_file.with_suffix(".tmp.npy")
        np.save(tmp, corpus.ids, allow_pickle=False)
        os.replace(tmp, ids_file)
        meta_file.write_text(json.dumps({"vocab": corpus.vocab.chars, "crlf": corpus.crlf_converted}))
    except OSError:
        pass  # the cache only saves time; a run without it is still correct
    return corpus


def split_train_val(ids: np.ndarray, val_frac: float, path="corpus") -> tuple:
    """The last val_frac of the text is the validation tail, the rest trains. Both keep >= 2 characters."""
    n = len(ids)
    n_val = max(2, int(round(n * val_frac)))
    if n - n_val < 2:
        raise CharlmError(
            f"{path} has only {n} character(s); charlm needs at least 4 to train and validate "
            "(and around 100,000 to learn anything useful)"
        )
    return ids[: n - n_val], ids[n - n_val :]


@dataclass
class Streams:
    """Rows of a padded id matrix, each a contiguous stream; positions [lo[b], hi[b]) of row b are scored.

    data[b, j] is the input at column j and data[b, j+1] its target; columns outside a row's scored range
    have target -1 (ignored by the loss)."""

    data: np.ndarray  # (B, W+1) ids
    lo: np.ndarray  # (B,) first scored column
    hi: np.ndarray  # (B,) one past the last scored column

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    @property
    def width(self) -> int:
        return self.data.shape[1] - 1

    def num_chunks(self, seq_len: int) -> int:
        return -(-self.width // seq_len)

    def scored(self) -> int:
        return int((self.hi - self.lo).sum())

    def scored_in_chunk(self, k: int, seq_len: int) -> int:
        a, b = k * seq_len, min((k + 1) * seq_len, self.width)
        return int((np.clip(self.hi, a, b) - np.clip(self.lo, a, b)).sum())

    def select(self, rows) -> "Streams":
        return Streams(self.data[rows], self.lo[rows], self.hi[rows])

    def chunk(self, k: int, seq_len: int) -> tuple:
        """(inputs, targets) of chunk k as int64 tensors of shape (rows, <= seq_len)."""
        a, b = k * seq_len, min((k + 1) * seq_len, self.width)
        block = torch.from_numpy(self.data[:, a : b + 1].astype(np.int64))  # (rows, b-a+1)
        inputs, targets = block[:, :-1], block[:, 1:].clone()
        cols = torch.arange(a, b).unsqueeze(0)  # (1, b-a)
        keep = (cols >= torch.from_numpy(self.lo).unsqueeze(1)) & (cols < torch.from_numpy(self.hi).unsqueeze(1))
        targets[~keep] = -1
        return inputs, targets


def make_streams(ids: np.ndarray, rows: int, burn_in: int = 0) -> Streams:
    """Lay ids out as `rows` contiguous streams (the diagram at the top of this file).

    With burn_in > 0, every row but the first also starts with up to burn_in unscored characters taken from
    just before its own start, to warm its state."""
    pairs = len(ids) - 1
    if pairs < 1:
        raise ValueError("need at least 2 characters to make a stream")
    rows = max(1, min(rows, pairs))
    starts = np.arange(rows + 1) * pairs // rows  # (rows+1,) pair offsets; row b scores [starts[b], starts[b+1])
    warm = np.minimum(starts[:-1], burn_in)  # (rows,) unscored warm-up characters before each row
    begin = starts[:-1] - warm
    lengths = starts[1:] - begin  # (rows,) inputs per row including warm-up
    width = int(lengths.max())
    data = np.zeros((rows, width + 1), dtype=ids.dtype)  # +1: the final target column
    for b in range(rows):  # one slice copy per row, not per character
        data[b, : lengths[b] + 1] = ids[begin[b] : begin[b] + lengths[b] + 1]
    return Streams(data, warm.astype(np.int64), lengths.astype(np.int64))


def fit_layout(n_pairs: int, batch_size: int, seq_len: int) -> tuple:
    """Shrink batch and chunk for a small corpus, so each stream holds at least one full chunk.

    Returns (batch_size, seq_len) to use; equal to the inputs whenever the corpus is big enough."""
    batch = max(1, min(batch_size, n_pairs // seq_len))
    seq = max(1, min(seq_len, n_pairs // batch))
    return batch, seq
