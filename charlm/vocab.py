"""Vocabulary: the sorted set of Unicode code points of a corpus, and vectorised encode/decode."""

from __future__ import annotations

import numpy as np

from charlm.errors import CharlmError


def describe_chars(chars) -> str:
    """Show characters so that whitespace and control characters are visible: 'a', '\\n', 'U+200B'."""
    shown = []
    for ch in chars:
        if ch.isprintable() and not ch.isspace():
            shown.append(ch)
        elif ch in "\n\r\t ":
            shown.append(repr(ch)[1:-1] if ch != " " else "' '")
        else:
            shown.append(f"U+{ord(ch):04X}")
    return " ".join(shown)


SKIP_FIX = "remove them or pass --unknown skip to drop them"


def unknown_message(where: str, missing, fix: str = SKIP_FIX, at: "int | None" = None) -> str:
    """The one wording of "this text has characters the model does not know": where, how many, which
    (the first 20, visibly), where the first one is when known, and the fix."""
    missing = list(missing)
    shown = describe_chars(missing[:20]) + (" ..." if len(missing) > 20 else "")
    first = f" (the first at character {at:,})" if at is not None else ""
    return f"{where} has {len(missing)} character(s) not in the model's vocabulary: {shown}{first}; {fix}"


class Vocabulary:
    """Maps characters to ids 0..V-1 in code-point order, so the same corpus always gives the same ids."""

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or list(chars) != sorted(chars):
            raise ValueError("vocabulary characters must be sorted and distinct")
        if not chars:
            raise ValueError("a vocabulary needs at least one character")
        self.chars = chars
        self.codes = np.array([ord(c) for c in chars], dtype=np.int64)
        # A dense code point -> id table: one vectorised take() encodes a whole array of code points.
        self._table = np.full(int(self.codes[-1]) + 1, -1, dtype=np.int32)
        self._table[self.codes] = np.arange(len(chars), dtype=np.int32)
        self._index = {c: i for i, c in enumerate(chars)}

    @property
    def size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, ch: str) -> bool:
        return ch in self._index

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and other.chars == self.chars

    def with_chars(self, extra) -> "Vocabulary":
        """This vocabulary and the characters of `extra`, sorted: what a fine-tuned model grows into
        (grow.py moves each old character's weights to its position here)."""
        return Vocabulary("".join(sorted(set(self.chars) | set(extra))))

    def id_dtype(self):
        """The narrowest integer type that holds every id: 1 byte per character for most corpora, 2 for
        nearly all others (65,536 distinct characters), 4 beyond."""
        return np.uint8 if self.size <= 256 else np.uint16 if self.size <= 65536 else np.uint32

    def ids_from_codes(self, codes: np.ndarray) -> np.ndarray:
        """Code points -> ids; -1 where a code point is not in the vocabulary."""
        codes = np.asarray(codes)
        if codes.size and int(codes.max()) < len(self._table):  # the common case: one gather
            return self._table[codes]
        ids = np.full(codes.shape, -1, dtype=np.int32)
        inside = codes < len(self._table)
        ids[inside] = self._table[codes[inside]]
        return ids

    def unknown(self, text: str) -> list:
        """The distinct characters of text that the vocabulary lacks, sorted."""
        return sorted(set(text) - self._index.keys())

    def encode(self, text: str, unknown: str = "error", where: str = "the text") -> np.ndarray:
        """Text -> int64 ids. unknown='error' refuses characters outside the vocabulary, 'skip' drops them."""
        missing = self.unknown(text)
        if missing:
            if unknown == "skip":
                text = "".join(c for c in text if c in self._index)
            else:
                raise CharlmError(unknown_message(where, missing))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        return self._table[codes].astype(np.int64) if len(codes) else np.zeros(0, dtype=np.int64)

    def decode(self, ids) -> str:
        """ids -> text, vectorised: the code points go through UTF-32 (4 bytes a character, no per-character
        Python object)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return self.codes[ids].astype("<u4").tobytes().decode("utf-32-le") if len(ids) else ""
