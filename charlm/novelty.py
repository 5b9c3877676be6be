"""How much of a sample was copied from the training text: the longest stretch found verbatim in it.

A single streaming scan of the (memory-mapped) corpus ids answers for a sample in about a second per
100 MB, with no index to build or store:

    sample ids s (m chars)      corpus ids c, in 4M-character chunks (each overlapping the next by m)
    |                           |
    every window of s of        per chunk: rolling hashes of every window of length L = best + 1,
    length L -> a set of        computed for all positions at once from one prefix sum; positions whose
    64-bit hashes               hash is in the sample's set are candidates; candidates are grown to L+1,
                                L+2, ... (only they are rehashed) while one still matches; best = L

A window hash is sum_t x[i+t] * R^t mod 2^64 with R the inverse of an odd constant: with the prefix sums
G[n] = sum_{j<n} x[j] R^j, the window at i is (G[i+L] - G[i]) * R^-i, so one cumulative sum gives every
window of every length. The answer is checked character by character at the end.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import numpy as np

_BASE = 0x9E3779B97F4A7C15  # odd, so it has an inverse modulo 2^64
_INV = pow(_BASE, -1, 2**64)
_CHUNK = 1 << 22  # corpus characters hashed at a time: ~32 MB per uint64 temporary
_SEED = 8  # the shortest stretch the first scan looks for


def _powers(base: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    if n > 1:
        out[1:] = np.uint64(base)
        np.cumprod(out, out=out)  # wraps modulo 2^64, as the hash needs
    return out


class _Hasher:
    """Window hashes of one array of ids: windows(L) for every start, at(starts, L) for some."""

    def __init__(self, x: np.ndarray, inv_pows: np.ndarray, pows: np.ndarray):
        n = len(x)
        with np.errstate(over="ignore"):
            prefix = np.zeros(n + 1, dtype=np.uint64)
            np.cumsum((x.astype(np.uint64) + np.uint64(1)) * inv_pows[:n], out=prefix[1:])
        self.prefix, self.pows, self.n = prefix, pows, n

    def windows(self, length: int, count: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (self.prefix[length : length + count] - self.prefix[:count]) * self.pows[:count]

    def at(self, starts: np.ndarray, length: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            return (self.prefix[starts + length] - self.prefix[starts]) * self.pows[starts]


def _member(hashes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Indices of hashes that are in wanted: a 2^20-slot table on the top bits rejects nearly all in one
    gather, and only the few left are looked up exactly (np.isin alone sorts the whole chunk)."""
    table = np.zeros(1 << 20, dtype=bool)
    table[(wanted >> np.uint64(44)).astype(np.intp)] = True
    maybe = np.flatnonzero(table[(hashes >> np.uint64(44)).astype(np.intp)])
    return maybe[np.isin(hashes[maybe], wanted)]


def longest_copies(corpus: np.ndarray, samples: List[np.ndarray],
                   progress: Optional[Callable[[int, int], None]] = None) -> List[Tuple[int, int]]:
    """For each sample (ids under the corpus's vocabulary), (start in the sample, length) of its longest
    stretch that appears verbatim in corpus. Length 0 when not even one character does. progress(done, total)
    is called after each chunk of the corpus, in corpus characters scanned; a sample that shares no stretch
    of _SEED characters with the corpus needs another scan per shorter length, which adds to the total."""
    longest = max((len(s) for s in samples), default=0)
    if longest == 0 or len(corpus) == 0:
        return [(0, 0) for _ in samples]
    scans = [0]  # passes over the corpus begun so far

    def scanned(at: int) -> None:
        if progress is not None:
            progress((scans[0] - 1) * len(corpus) + at, scans[0] * len(corpus))

    span = _CHUNK + longest + 1
    inv_pows, pows = _powers(_INV, span), _powers(_BASE, span)
    hashers = [_Hasher(np.asarray(s), inv_pows, pows) for s in samples]
    # First look only for stretches of at least _SEED characters (short ones match nearly everywhere, which
    # would make every position a candidate); only a sample with none at all is scanned again from 1.
    best = [(0, min(_SEED, len(s)) - 1, 0) if len(s) else (0, 0, 0) for s in samples]
    best = _scan(corpus, samples, hashers, best, inv_pows, pows, longest, scans, scanned)
    best = [b if b[1] >= min(_SEED, len(s)) else (0, 0, 0) for b, s in zip(best, samples)]  # found nothing
    # A sample with none at all: look for each shorter length in turn, longest first (one scan each).
    done = [b[1] > 0 for b in best]
    for length in range(_SEED - 1, 0, -1):
        again = [k for k, b in enumerate(best) if b[1] == 0 and len(samples[k]) >= length and not done[k]]
        if not again:
            continue
        redo = _scan(corpus, [samples[k] for k in again], [hashers[k] for k in again],
                     [(0, length - 1, 0)] * len(again), inv_pows, pows, longest, scans, scanned)
        for k, b in zip(again, redo):
            if b[1] >= length:
                best[k], done[k] = b, True
    out = []
    for (start, length, where), s in zip(best, samples):
        found = np.array_equal(np.asarray(corpus[where : where + length]), np.asarray(s)[start : start + length])
        out.append((start, length) if found else (0, 0))  # a hash collision (never seen) reports nothing
    return out


def _scan(corpus, samples, hashers, best, inv_pows, pows, longest, scans, scanned) -> list:
    best = list(best)
    scans[0] += 1
    for a in range(0, len(corpus), _CHUNK):
        piece = np.asarray(corpus[a : a + _CHUNK + longest])  # the overlap lets any window start in the chunk
        starts_here = min(_CHUNK, len(piece))
        chunk = _Hasher(piece, inv_pows, pows)
        for k, (h, s) in enumerate(zip(hashers, samples)):
            best[k] = _grow(chunk, a, starts_here, h, len(s), best[k])
        scanned(a + starts_here)
    return best


def _grow(chunk: _Hasher, offset: int, starts_here: int, sample: _Hasher, m: int, best: tuple) -> tuple:
    """Improve best with this chunk: windows of length best+1 first, then only the candidates grow."""
    length = best[1] + 1
    if length > m:
        return best
    count = min(starts_here, chunk.n - length + 1)
    if count <= 0:
        return best
    cand = _member(chunk.windows(length, count), np.unique(sample.windows(length, m - length + 1)))
    while len(cand):
        hit = chunk.at(cand[:1], length)[0]
        at_sample = np.flatnonzero(sample.windows(length, m - length + 1) == hit)
        best = (int(at_sample[0]) if len(at_sample) else 0, length, offset + int(cand[0]))
        length += 1
        cand = cand[cand + length <= chunk.n]
        if length > m or not len(cand):
            break
        wanted = np.unique(sample.windows(length, m - length + 1))
        cand = cand[_member(chunk.at(cand, length), wanted)]
    return best
