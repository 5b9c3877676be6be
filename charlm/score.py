"""Per-character scores: the log-probability the model gave every character of a text, its rank, and the
model's top predictions at that point. Pure library code: arrays in, arrays out, nothing printed.

One stateful pass, the same one `charlm eval` makes, carries the hidden state across pieces and chunks, so
memory stays constant in the length of the text:

    context c (default: the line break sampling starts from)
    state0 --c--> state, logits -> predicts text[0]
              --text[0]--> state, logits -> predicts text[1]   ... and so on, piece after piece

So the first character is conditioned on the context character alone (a fresh state that has read one
`context_id`), and every later character on the context plus all the text before it. `charlm eval`
instead starts from a fresh state at the text's first character and scores from the second one on: scoring
a text here gives exactly eval's numbers on the same text with the context character put in front of it.

`score_stream` is the one-stream pass (any iterator of id pieces, for example stdin as it arrives).
`score_ids` scores an id array that is all there (a file), optionally in several parallel streams, each
warmed on the characters before it as eval's streams are: the same numbers up to the warm-up's tiny
approximation, several times faster on a CPU.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from charlm import state as st
from charlm.evaluation import perplexity
from charlm.model import CharRNN, start_state
from charlm.vocab import Vocabulary


@dataclass
class ScoreChunk:
    """Scores of consecutive characters text[start : start + n]."""

    ids: np.ndarray  # (n,) int64: the characters scored
    logprob: np.ndarray  # (n,) float32: natural-log probability the model gave each one
    rank: np.ndarray  # (n,) int64: how many characters the model found strictly more likely (0 = its top choice)
    top_ids: np.ndarray  # (n, top) int64: the model's most likely next characters, most likely first
    top_p: np.ndarray  # (n, top) float32: their probabilities
    start: int  # index of the first character in the whole text

    def __len__(self) -> int:
        return len(self.ids)

    @staticmethod
    def concat(chunks: list, start: int = 0, top: int = 0) -> "ScoreChunk":
        """Join consecutive chunks into one (an empty chunk at `start` when there are none)."""
        if not chunks:
            return ScoreChunk(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64),
                              np.zeros((0, top), np.int64), np.zeros((0, top), np.float32), start)
        return ScoreChunk(*(np.concatenate([getattr(c, f) for c in chunks]) for f in
                            ("ids", "logprob", "rank", "top_ids", "top_p")), chunks[0].start)


def default_context_id(vocab: Vocabulary) -> int:
    """The id the pass warms on before the first character: where sampling without a prime starts."""
    from charlm.sample import default_context

    return int(vocab.encode(default_context(vocab))[0])


def _score_logits(logits: torch.Tensor, targets: torch.Tensor, top: int) -> tuple:
    """logits (n, V) predicting targets (n,) -> numpy (logprob, rank, top_ids, top_p)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (n, V)
    lp = logp.gather(1, targets.unsqueeze(1))  # (n, 1)
    rank = (logp > lp).sum(dim=1)  # (n,)
    k = min(top, logp.shape[1])
    top_lp, top_ids = torch.topk(logp, k, dim=1) if k else (logp[:, :0], targets.new_zeros(len(targets), 0))
    return (lp.squeeze(1).cpu().numpy(), rank.cpu().numpy().astype(np.int64),
            top_ids.cpu().numpy().astype(np.int64), top_lp.exp().cpu().numpy())


def _warm(model: CharRNN, context_id: int, device) -> tuple:
    """(logits (V,) predicting the first character, state after reading the context character)."""
    x = torch.tensor([[context_id]], dtype=torch.long, device=device)
    logits, state = model(x, model.init_state(1, device))
    return logits[0, -1], state


@torch.no_grad()
def score_stream(model: CharRNN, ids_iter: Iterable, device, top: int = 5, context_id: Optional[int] = None,
                 chunk: int = 2048, vocab: Optional[Vocabulary] = None) -> Iterator[ScoreChunk]:
    """Score pieces of ids as they come, in one stateful stream; one ScoreChunk per <= `chunk` characters.

    ids_iter yields 1-D integer arrays (pieces of any size, empty ones allowed). The first character is
    predicted after warming on context_id; when it is None, on default_context_id(vocab) (vocab is then
    required: the model alone does not know which id is a line break)."""
    device = torch.device(device)
    model.eval()
    if context_id is None:
        if vocab is None:
            raise ValueError("score_stream needs context_id or vocab (to find the default context)")
        context_id = default_context_id(vocab)
    next_logits, state = _warm(model, context_id, device)  # (V,)
    at = 0
    for piece in ids_iter:
        piece = np.asarray(piece, dtype=np.int64).reshape(-1)
        for a in range(0, len(piece), chunk):
            ids = torch.from_numpy(piece[a : a + chunk]).to(device)  # (n,)
            logits, state = model(ids.unsqueeze(0), state)  # (1, n, V)
            predicting = torch.cat([next_logits.unsqueeze(0), logits[0, :-1]])  # (n, V): row j predicts ids[j]
            next_logits = logits[0, -1]
            lp, rank, top_ids, top_p = _score_logits(predicting, ids, top)
            yield ScoreChunk(ids.cpu().numpy(), lp, rank, top_ids, top_p, at)
            at += len(ids)


@torch.no_grad()
def score_ids(model: CharRNN, pieces, device, top: int = 5, context_id: Optional[int] = None,
              vocab: Optional[Vocabulary] = None, streams: int = 8, burn_in: int = 256, row_chars: int = 32768,
              seq_len: int = 256) -> Iterator[ScoreChunk]:
    """Score a text in order, `streams` rows at a time; pieces is one id array or an iterable of them.

    The text is cut into blocks of `streams` contiguous rows of `row_chars` characters. The first row of a
    block carries the exact state the previous block's last row ended with (the text continues there); every
    other row starts fresh and is first warmed on the `burn_in` characters before it, as eval's streams are.
    All rows of a full block have the same length, so no padding ever runs through a carried state. What is
    left at the end is split into at most `streams` rows of at least 8 * burn_in characters (one row for a
    text under 4096 characters, which is then exactly the one-stream pass). Memory: one block of ids and
    scores, whatever the length of the text.

    Defaults: 8 rows like eval's default streams; 32k characters a row keeps a block's scores near 10 MB and
    the warm-up overhead at burn_in/row_chars < 1%; 256-column chunks like eval's seq_len."""
    device = torch.device(device)
    model.eval()
    if isinstance(pieces, np.ndarray):
        pieces = [pieces]
    if streams <= 1:
        yield from score_stream(model, pieces, device, top, context_id, vocab=vocab)
        return
    if context_id is None:
        if vocab is None:
            raise ValueError("score_ids needs context_id or vocab (to find the default context)")
        context_id = default_context_id(vocab)
    width = row_chars + burn_in  # input columns of every row of a full block
    full = width + (streams - 1) * row_chars  # characters scored by a full block
    buf = np.zeros(0, dtype=np.int64)  # ids from base on: up to burn_in + 1 already scored, then unscored
    base, pos = 0, 0  # text index of buf[0]; text index of the next character to score
    state = None  # carried into the next block's first row (None: start from the context)
    for piece in itertools.chain(pieces, [None]):
        if piece is not None:
            buf = np.concatenate([buf, np.asarray(piece, dtype=np.int64).reshape(-1)])
        while len(buf) - (pos - base) >= (full if piece is not None else 1):
            remaining = len(buf) - (pos - base)
            if remaining >= full:
                lengths = [width] + [row_chars] * (streams - 1)
            else:  # the end: split what is left evenly (rows of >= 8 warm-ups), padding the rows' ends
                rows = max(1, min(streams, remaining // (8 * max(burn_in, 1))))
                lengths = np.diff(np.linspace(0, remaining, rows + 1).astype(np.int64)).tolist()
            carry = []
            yield from _score_block(model, buf, pos - base, base, lengths, state, context_id, burn_in, top,
                                    seq_len, device, carry)
            state = carry[0]
            pos += sum(lengths)
            drop = max(0, pos - base - (burn_in + 1))  # keep the history the next block's warm-ups read
            buf, base = buf[drop:], base + drop


def _score_block(model, ids, pos, base, lengths, state, context_id, burn_in, top, seq_len, device, carry):
    """Score rows of ids from local index pos (text index base + pos) with the given lengths; append the
    last row's end state to carry."""
    rows = len(lengths)
    inputs, warm = [], []
    at = pos
    for r, n in enumerate(lengths):
        if r == 0:  # continues the text: carried state, the previous character (or the context) goes in first
            prev = ids[at - 1] if base + at > 0 else context_id
            seq = np.concatenate([[prev], ids[at : at + n - 1]])
            warm.append(0)
        else:
            w = min(burn_in, at - 1)
            seq = ids[at - 1 - w : at + n - 1]
            warm.append(w)
        inputs.append(np.asarray(seq, dtype=np.int64))
        at += n
    width = max(len(s) for s in inputs)
    x = np.zeros((rows, width), dtype=np.int64)  # (rows, width) right-padded inputs
    for r, s in enumerate(inputs):
        x[r, : len(s)] = s
    targets = np.full((rows, width), -1, dtype=np.int64)  # column j of row r predicts targets[r, j]
    at = pos
    for r, n in enumerate(lengths):
        targets[r, warm[r] : warm[r] + n] = ids[at : at + n]
        at += n
    # the first row carries the previous block's state (the text's first reads the context as its first input);
    # the others start where every stream does, after the context (model.start_state), then warm up
    first = model.init_state(1, device) if state is None else state
    state = st.concat_rows([first, start_state(model, rows - 1, device, context_id)]) if rows > 1 else first
    out = {f: [[] for _ in range(rows)] for f in ("lp", "rank", "top_ids", "top_p")}
    xt = torch.from_numpy(x).to(device)
    tt = torch.from_numpy(targets).to(device)
    for a in range(0, width, seq_len):
        b = min(a + seq_len, width)
        logits, state = model(xt[:, a:b], state)  # (rows, b-a, V)
        mask = tt[:, a:b] >= 0  # (rows, b-a)
        if not bool(mask.any()):
            continue
        flat = logits[mask]  # (m, V) in row-major order: row by row
        lp, rank, top_ids, top_p = _score_logits(flat, tt[:, a:b][mask], top)
        counts = mask.sum(dim=1).tolist()
        o = 0
        for r, c in enumerate(counts):
            if c:
                out["lp"][r].append(lp[o : o + c])
                out["rank"][r].append(rank[o : o + c])
                out["top_ids"][r].append(top_ids[o : o + c])
                out["top_p"][r].append(top_p[o : o + c])
                o += c
    # In a full block every row is `width` long, so this is the exact state at the end of the last row; after
    # the (padded) last block nothing reads it.
    carry.append(st.select_rows(state, [rows - 1]))
    at = pos
    for r, n in enumerate(lengths):
        yield ScoreChunk(ids[at : at + n].astype(np.int64), np.concatenate(out["lp"][r]),
                         np.concatenate(out["rank"][r]), np.concatenate(out["top_ids"][r]),
                         np.concatenate(out["top_p"][r]), base + at)
        at += n


def score_text(model: CharRNN, vocab: Vocabulary, text: str, device, top: int = 5) -> ScoreChunk:
    """Every character of a (small) text at once, in one stream. Characters outside the vocabulary raise
    CharlmError naming them (encode them with unknown='skip' and call score_stream to drop them instead)."""
    ids = vocab.encode(text)
    chunks = list(score_stream(model, [ids], device, top, default_context_id(vocab), vocab=vocab))
    return ScoreChunk.concat(chunks, 0, min(top, vocab.size))


@dataclass
class Summary:
    """Running totals over ScoreChunks: loss figures and the most surprising spans, in constant memory.

    A span is a window of `span` consecutive characters ranked by its total surprisal (-log p); the summary
    keeps the `spans` highest that do not overlap one another. Defaults: 5 spans of 24 characters, a phrase
    long enough to read, short enough to point at what surprised the model."""

    vocab: Vocabulary
    span: int = 24
    spans: int = 5
    nats: float = 0.0
    chars: int = 0
    _tail: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # surprisal of the last span-1 chars
    _tail_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _best: list = field(default_factory=list)  # heap of (total, start, text)

    def update(self, chunk: ScoreChunk) -> None:
        s = -chunk.logprob.astype(np.float64)  # (n,) surprisal in nats
        self.nats += float(s.sum())
        self.chars += len(s)
        sur = np.concatenate([self._tail, s])
        ids = np.concatenate([self._tail_ids, chunk.ids])
        first = chunk.start - len(self._tail)  # text index of sur[0]
        if len(sur) >= self.span:
            c = np.concatenate([[0.0], np.cumsum(sur)])
            totals = c[self.span :] - c[: -self.span]  # (windows,) window j covers sur[j : j + span]
            # the few best windows of this piece that do not overlap: enough candidates for the global top
            for j in np.argsort(-totals, kind="stable")[: 8 * self.spans]:
                self._offer(float(totals[j]), first + int(j), ids[j : j + self.span])
        keep = self.span - 1
        self._tail, self._tail_ids = sur[-keep:] if keep else sur[:0], ids[-keep:] if keep else ids[:0]

    def _offer(self, total: float, start: int, ids: np.ndarray) -> None:
        overlapping = [b for b in self._best if abs(b[1] - start) < self.span]
        if any(b[0] >= total for b in overlapping):  # a kept span that overlaps it is more surprising
            return
        if overlapping:
            self._best = [b for b in self._best if abs(b[1] - start) >= self.span]
            heapq.heapify(self._best)
        entry = (total, start, self.vocab.decode(ids))
        if len(self._best) < self.spans:
            heapq.heappush(self._best, entry)
        elif total > self._best[0][0]:
            heapq.heapreplace(self._best, entry)

    def result(self) -> dict:
        loss = self.nats / self.chars if self.chars else float("nan")
        spans = sorted(self._best, key=lambda b: -b[0])
        return {"chars": self.chars, "nats": self.nats, "nats_per_char": loss, "bits_per_char": loss / math.log(2),
                "perplexity": perplexity(loss) if self.chars else float("nan"),
                "surprising_spans": [{"start": s, "text": t, "nats": tot, "nats_per_char": tot / self.span}
                                     for tot, s, t in spans]}
