"""Laying ids out as the contiguous streams that training and evaluation walk, without copying the corpus.

How a corpus becomes batches. The training text (ids) gives M = N-1 (input, target) pairs; they are cut into
B contiguous streams, stream i starting at offset i*M//B, and every stream is walked left to right in
chunks of T columns (truncated backpropagation through time):

    ids:       a b c d e f g h i j k l m n o p q r s t u v w x y      N = 25, M = 24 pairs, B = 3
               |--- stream 0 ---||--- stream 1 ---||--- stream 2 ---|
    row 0:     a b c d e f g h (i)    inputs a..h, targets b..i
    row 1:     i j k l m n o p (q)    each row also reads the character after its last input,
    row 2:     q r s t u v w x (y)    its final target
               \\_chunk 0_/\\_chunk 1_/ ...   T = 4: chunk k holds columns kT .. kT+T-1

Row b of chunk k+1 continues exactly where row b of chunk k stopped, so the hidden state the model ends
chunk k with is the right state to start chunk k+1 with: that state is carried, detached, from chunk to
chunk (state.py). When B does not divide M the rows differ in length by one; a short row's missing last
target is masked (-1), so one epoch predicts every training character exactly once.

A `Streams` is only offsets into `ids`, which is usually the memory-mapped corpus (corpus.py): `chunk(k)`
gathers the (B, T+1) window it needs and nothing else, so memory does not grow with the corpus, and a
process under torchrun that `select`s its own rows reads only their text.

Evaluation uses the same layout over the validation text with a few long streams; every stream but the
first is first warmed on the `burn_in` characters before it (scored by none), so the pass scores like one
unbroken stateful pass while running in parallel. `eval_streams` bounds a pass to a fixed, evenly spread
sample of the validation text (periodic evaluations on large corpora).

A tagged text (tags.py) has a tag track beside its ids, indexed alike: `chunk_tags` gathers the tag of each
target, so every prediction is conditioned on the voice of the character it predicts:

    ids:   a b c d | e f g h       row 0 of chunk 0 (T = 4); a file of tag 0, then one of tag 1
    tags:  0 0 0 0 | 1 1 1 1
    inputs a b c d   targets b c d e   target tags 0 0 0 1   (the "e" is predicted in tag 1's voice)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class Streams:
    """Rows of a virtual (B, W+1) id matrix: row b is ids[begin[b] : begin[b] + length[b] + 1], zero-padded.

    Column j of a row is the input at j and column j+1 its target; positions [lo[b], hi[b]) of row b are
    scored, and every other target is -1 (ignored by the loss). `width` is W for the whole layout, also
    after `select`, so every process of a torchrun job walks the same number of chunks."""

    ids: np.ndarray  # (N,) the text: a memory map or an array; never copied
    begin: np.ndarray  # (B,) index in ids of each row's column 0
    length: np.ndarray  # (B,) inputs per row (the row also reads its final target, ids[begin + length])
    lo: np.ndarray  # (B,) first scored column
    hi: np.ndarray  # (B,) one past the last scored column
    width: int  # W: columns of inputs of the longest row of the whole layout
    tags: Optional[np.ndarray] = None  # (N,) the tag of each character of ids, for a tagged text

    @property
    def rows(self) -> int:
        return len(self.begin)

    def num_chunks(self, seq_len: int) -> int:
        return -(-self.width // seq_len)

    def scored(self) -> int:
        return int((self.hi - self.lo).sum())

    def scored_in_chunk(self, k: int, seq_len: int) -> int:
        a, b = k * seq_len, min((k + 1) * seq_len, self.width)
        return int((np.clip(self.hi, a, b) - np.clip(self.lo, a, b)).sum())

    def select(self, rows) -> "Streams":
        return replace(self, begin=self.begin[rows], length=self.length[rows], lo=self.lo[rows], hi=self.hi[rows])

    def chunk(self, k: int, seq_len: int) -> tuple:
        """(inputs, targets) of chunk k as int64 tensors of shape (rows, <= seq_len)."""
        a, b = k * seq_len, min((k + 1) * seq_len, self.width)
        cols = np.arange(a, b + 1)  # (t+1,) columns: t inputs and the target after the last
        inside = cols[None, :] <= self.length[:, None]  # (rows, t+1) columns the row really has
        index = self.begin[:, None] + np.minimum(cols[None, :], self.length[:, None])  # clamped: in range
        block = np.where(inside, self.ids[index], 0).astype(np.int64)  # one gather from the map
        block = torch.from_numpy(block)
        inputs, targets = block[:, :-1], block[:, 1:].clone()
        scored = (cols[None, :-1] >= self.lo[:, None]) & (cols[None, :-1] < self.hi[:, None])
        targets[~torch.from_numpy(scored)] = -1
        return inputs, targets

    def chunk_tags(self, k: int, seq_len: int) -> Optional[torch.Tensor]:
        """The tag of each target of chunk k, (rows, <= seq_len) int64; None for an untagged text."""
        if self.tags is None:
            return None
        a, b = k * seq_len, min((k + 1) * seq_len, self.width)
        cols = np.arange(a + 1, b + 1)  # the targets' columns
        index = self.begin[:, None] + np.minimum(cols[None, :], self.length[:, None])
        return torch.from_numpy(self.tags[index].astype(np.int64))


def _layout(ids: np.ndarray, starts: np.ndarray, ends: np.ndarray, burn_in: int, tags=None) -> Streams:
    """Rows scoring pairs [starts[b], ends[b]), each warmed on up to burn_in characters before its start."""
    warm = np.minimum(starts, burn_in)  # (rows,) unscored warm-up characters before each row
    begin = starts - warm
    length = ends - begin  # (rows,) inputs per row including warm-up
    return Streams(ids, begin.astype(np.int64), length.astype(np.int64), warm.astype(np.int64),
                   length.astype(np.int64), int(length.max()), tags)


def make_streams(ids: np.ndarray, rows: int, burn_in: int = 0, tags: Optional[np.ndarray] = None) -> Streams:
    """Lay ids out as `rows` contiguous streams that together score every pair once (the diagram above).

    With burn_in > 0, every row but the first also starts with up to burn_in unscored characters taken from
    just before its own start, to warm its state."""
    pairs = len(ids) - 1
    if pairs < 1:
        raise ValueError("need at least 2 characters to make a stream")
    rows = max(1, min(rows, pairs))
    starts = np.arange(rows + 1, dtype=np.int64) * pairs // rows  # row b scores [starts[b], starts[b+1])
    return _layout(ids, starts[:-1], starts[1:], burn_in, tags)


def eval_streams(ids: np.ndarray, rows: int, burn_in: int = 0, max_chars: Optional[int] = None,
                 tags: Optional[np.ndarray] = None, min_rows: int = 1) -> Streams:
    """The layout of one evaluation pass: every pair of ids, or, when there are more than max_chars, a fixed
    sample of them: `rows` segments of max_chars/rows pairs spread evenly from the first pair to the last,
    each warmed like a full pass's rows. The same ids and arguments always give the same segments.

    A whole pass over a short text gets fewer rows, so that no row scores fewer characters than it burns in,
    though not fewer than min_rows (one per process) where `rows` and the text allow: 32 rows over a
    2,500-character tail ran 10,700 positions to score 2,500 and took twice as long as 9 rows, which score the
    same characters as warmly. A sample keeps its rows: its standard error compares them."""
    pairs = len(ids) - 1
    if max_chars is None or max_chars <= 0 or pairs <= max_chars:
        if burn_in > 0:
            rows = min(rows, max(min_rows, pairs // burn_in))
        return make_streams(ids, rows, burn_in, tags)
    rows = max(1, min(rows, max_chars))
    seg = np.diff(np.arange(rows + 1, dtype=np.int64) * max_chars // rows)  # (rows,) lengths: sum max_chars
    starts = np.linspace(0, pairs - seg.max(), rows).round().astype(np.int64)  # evenly spread, both ends
    starts[-1] = pairs - seg[-1]
    return _layout(ids, starts, starts + seg, burn_in, tags)


def fit_layout(n_pairs: int, batch_size: int, seq_len: int) -> tuple:
    """Shrink batch and chunk for a small corpus, so each stream holds at least one full chunk.

    Returns (batch_size, seq_len) to use; equal to the inputs whenever the corpus is big enough."""
    batch = max(1, min(batch_size, n_pairs // seq_len))
    seq = max(1, min(seq_len, n_pairs // batch))
    return batch, seq
