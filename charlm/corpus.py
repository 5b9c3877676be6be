"""Reading text files into ids that live on disk, memory-mapped: corpora of any size in constant memory.

    files (sorted; a folder's files, a glob's matches)          one SHA-256 over all of them
      |  read in 4 MB pieces, decoded incrementally, CRLF -> LF, checked (NUL bytes, bad encoding: named)
      v
    pass 1: count characters, collect the vocabulary             (skipped when the cache has this corpus)
    pass 2: encode each piece, append it to ids-<key>.bin        uint8 / uint16 / uint32 by vocabulary size
      v
    np.memmap of the ids: training and evaluation gather the windows they need from it (streams.py)

Neither pass holds more than a piece: no full-size bytes, string or temporary. Files are joined with
DOC_SEPARATOR. The encoded ids are cached beside the run directories, keyed by the SHA-256 of the files
and the decoding options, so the next run on the same text maps the cached file and starts at once.
The decoder (_pieces, read_text) is the one every command reads text with: score, explain and --prime-file
too, stdin included, as it arrives.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

from charlm.errors import CharlmError
from charlm.files import write_atomic
from charlm.vocab import Vocabulary, unknown_message

# Decode this many bytes at a time: big enough that per-piece overhead vanishes, small enough that the
# temporary UTF-32 copy of a piece (4 bytes per character) stays small next to any corpus.
_PIECE_BYTES = 1 << 22
# Between the files of a multi-file corpus: a blank line, the way documents are usually set apart in text,
# so the model learns where one ends and the next begins without a character of its own.
DOC_SEPARATOR = "\n\n"
CACHE_VERSION = 3  # bump when the cached file layout changes


@dataclass(frozen=True)
class CorpusText:
    """An encoded corpus: ids under its vocabulary plus what is needed to recognise the files again."""

    ids: np.ndarray  # (N,) uint8/uint16/uint32: a read-only memory map, or an array for in-memory text
    vocab: Vocabulary
    path: str  # what to call it: the file, the folder, or "a.txt + 2 more"
    sha256: str  # of the file's bytes; for several files, of their SHA-256s in order
    crlf_converted: int  # how many CRLF line ends became LF
    files: List[dict] = field(default_factory=list)  # [{"path", "sha256", "bytes"}] in order
    ids_file: Optional[str] = None  # the cached ids file that `ids` maps, if any (other processes map it too)
    # where each file's text begins in `ids` (the separator after a file counts as that file's): what a tag per
    # file or folder is laid over (tags.py)
    file_starts: List[int] = field(default_factory=list)

    @property
    def chars(self) -> int:
        return len(self.ids)

    def info(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "chars": int(len(self.ids)),
                "files": [f["path"] for f in self.files]}


# ---------------------------------------------------------------------------------------------- sources
class _Source:
    """One input: a file on disk (read in pieces, never whole) or bytes already in memory."""

    def __init__(self, name: str, path: Optional[Path] = None, data: Optional[bytes] = None):
        self.name, self.path, self.data = name, path, data
        self.counted: Optional[Callable[[int], None]] = None  # told the size of every block read (progress)

    def open(self) -> BinaryIO:
        if self.data is not None:
            return io.BytesIO(self.data)
        try:
            f = open(self.path, "rb")
            return _Counted(f, self.counted) if self.counted else f
        except PermissionError:
            raise CharlmError(f"{self.name}: permission denied; make the file readable (chmod +r) or copy it")
        except IsADirectoryError:
            raise CharlmError(f"{self.name} is a directory; pass a text file or the folder itself")
        except OSError as exc:
            raise CharlmError(f"{self.name}: cannot read ({exc.strerror})")


class _Counted:
    """A binary file that reports the size of each block read from it (a corpus build's progress bar)."""

    def __init__(self, f: BinaryIO, counted: Callable[[int], None]):
        self.f, self.counted = f, counted

    def read(self, n: int = -1) -> bytes:
        block = self.f.read(n)
        self.counted(len(block))
        return block

    def seekable(self) -> bool:
        return self.f.seekable()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def expand_inputs(inputs: Sequence[Union[str, Path]]) -> List[Path]:
    """Files, folders (every non-hidden file under them) and glob patterns -> one sorted list of files."""
    files = []
    for item in inputs:
        p = Path(item)
        text = str(item)
        if not p.exists() and any(c in text for c in "*?["):
            matches = [Path(m) for m in glob.glob(text, recursive=True) if Path(m).is_file()]
            if not matches:
                raise CharlmError(f"{text}: no file matches this pattern")
            files += matches
        elif p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)]
            if not found:
                raise CharlmError(f"{p} is a folder with no files in it; put text files in it or pass a file")
            files += found
        elif not p.exists():
            raise CharlmError(f"{p}: no such file; check the path (named corpora: --corpus python-stdlib)")
        else:
            files.append(p)
    return sorted(set(files), key=str)


def describe_inputs(files: Sequence[Path], inputs: Sequence[Union[str, Path]]) -> str:
    if len(inputs) == 1 and Path(inputs[0]).is_dir():
        return str(inputs[0])
    return str(files[0]) if len(files) == 1 else f"{files[0]} + {len(files) - 1} more"


def _sha_of(sources: Sequence[_Source]) -> tuple:
    """(combined SHA-256, per-file [{"path", "sha256", "bytes"}]): one streaming pass of hashing."""
    per_file = []
    for src in sources:
        h, size = hashlib.sha256(), 0
        with src.open() as f:
            while True:
                block = f.read(_PIECE_BYTES)
                if not block:
                    break
                h.update(block)
                size += len(block)
        if size == 0:
            raise CharlmError(f"{src.name} is empty; give a file with some text in it")
        per_file.append({"path": src.name, "sha256": h.hexdigest(), "bytes": size})
    if len(per_file) == 1:
        return per_file[0]["sha256"], per_file
    return hashlib.sha256("\n".join(f["sha256"] for f in per_file).encode()).hexdigest(), per_file


# ---------------------------------------------------------------------------------------------- decoding
def _is_utf8(encoding: str) -> bool:
    try:
        return codecs.lookup(encoding).name in ("utf-8", "ascii")
    except LookupError:
        raise CharlmError(f"unknown --encoding {encoding!r}; use a Python codec name such as utf-8 or latin-1")


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _pieces(f: BinaryIO, name: str, encoding: str, keep_crlf: bool, crlf: List[int],
            piece_bytes: Optional[int] = None) -> Iterator[Union[bytes, str]]:
    """The one decoder every command reads text with: f's text a piece at a time, as it arrives.

    Yields bytes for a piece that is all ASCII (its bytes are its characters: the corpus's fast path) and str
    otherwise. CRLF becomes LF unless keep_crlf (counted into crlf[0]); a NUL byte or an undecodable byte is
    a CharlmError naming `name` and the byte offset in the whole input. Nothing is read ahead, so a pipe's
    reader sees each piece as soon as it is written (a stream that cannot seek is read with read1: what is
    there now, without waiting for a full piece)."""
    utf8 = _is_utf8(encoding)
    size = piece_bytes or _PIECE_BYTES  # read at call time: tests shrink the module's piece size
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    seekable = getattr(f, "seekable", lambda: False)()
    read = f.read if seekable or not hasattr(f, "read1") else f.read1
    held = False  # a trailing CR waits for the next piece, in case that piece starts with LF
    offset = 0  # bytes of f before this piece
    while True:
        block = read(size)
        final = not block
        if utf8 and b"\x00" in block:
            at = offset + block.index(b"\x00")
            raise CharlmError(f"{name}: looks binary (NUL byte at offset {at}); charlm reads text files only")
        pending = decoder.getstate()[0]  # the undecoded start of a character cut by the previous piece
        if utf8 and not pending and block.isascii():
            piece: Union[bytes, str] = (b"\r" if held else b"") + block
            cr, lf, crlf_pair = b"\r", b"\n", b"\r\n"
        else:
            try:
                text = decoder.decode(block, final)
            except UnicodeDecodeError as exc:
                # exc.start counts from the held bytes of the previous piece, which come first
                at = offset - len(pending) + exc.start
                seen = pending + block
                bad = seen[exc.start] if exc.start < len(seen) else 0
                raise CharlmError(
                    f"{name}: not valid {encoding} at byte offset {at} (byte 0x{bad:02x}); pass --encoding "
                    "(for example latin-1 or cp1252) if the text uses another encoding")
            except UnicodeError as exc:  # not about one byte: utf-16 without a byte-order mark, for one
                raise CharlmError(f"{name}: cannot be read as {encoding} ({exc}); pass the file's --encoding "
                                  "(for example utf-16-le or utf-8)")
            piece = ("\r" if held else "") + text
            cr, lf, crlf_pair = "\r", "\n", "\r\n"
        held = False
        if not keep_crlf:
            if piece.endswith(cr) and not final:
                piece, held = piece[:-1], True
            n = piece.count(crlf_pair)
            if n:
                crlf[0] += n
                piece = piece.replace(crlf_pair, lf)
        if piece:
            yield piece
        if final:
            return
        offset += len(block)


def read_text(f: BinaryIO, name: str, encoding: str = "utf-8", keep_crlf: bool = False,
              piece_bytes: Optional[int] = None) -> Iterator[str]:
    """Text pieces of an open binary file or stream (a file, stdin), decoded as corpora are (_pieces): what
    score, explain, eval and --prime-file read their input with."""
    for piece in _pieces(f, name, encoding, keep_crlf, [0], piece_bytes):
        yield piece.decode("ascii") if isinstance(piece, bytes) else piece


def read_file(path, encoding: str = "utf-8", keep_crlf: bool = False, name: Optional[str] = None) -> str:
    """A whole (small) file's text, decoded as corpora are: a prime, a text to explain or rank."""
    path = Path(path)
    if not path.exists():
        raise CharlmError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; pass a text file")
    name = name or str(path)
    with _Source(name, path=path).open() as f:
        return "".join(read_text(f, name, encoding, keep_crlf))


def _file_codes(src: _Source, encoding: str, keep_crlf: bool, crlf: List[int]) -> Iterator[np.ndarray]:
    """One file's characters as arrays of code points, a piece at a time: uint8 for an ASCII piece (its bytes
    are its code points), uint32 otherwise."""
    with src.open() as f:
        for piece in _pieces(f, src.name, encoding, keep_crlf, crlf):
            yield np.frombuffer(piece, dtype=np.uint8) if isinstance(piece, bytes) else _codes(piece)


def _all_codes(sources, encoding, keep_crlf, separator, crlf) -> Iterator[np.ndarray]:
    sep = _codes(separator)
    for i, src in enumerate(sources):
        if i and len(sep):
            yield sep
        yield from _file_codes(src, encoding, keep_crlf, crlf)


def _collect_vocab(sources, encoding, keep_crlf, separator) -> tuple:
    """Pass 1: (vocabulary, characters) of the text."""
    byte_counts = np.zeros(256, dtype=np.int64)
    seen: set = set()
    total = 0
    for codes in _all_codes(sources, encoding, keep_crlf, separator, [0]):
        total += len(codes)
        if codes.dtype == np.uint8:
            byte_counts += np.bincount(codes, minlength=256)
        else:
            seen.update(np.unique(codes).tolist())
    seen.update(np.flatnonzero(byte_counts).tolist())
    if not seen:
        raise CharlmError(f"{sources[0].name} is empty; give a file with some text in it")
    return Vocabulary("".join(map(chr, sorted(seen)))), total


def _encoder(vocab: Vocabulary, unknown: str, names) -> Callable[[np.ndarray], np.ndarray]:
    """codes -> ids (the vocabulary's id dtype), dropping (skip) or refusing (error) unknown characters."""
    byte_table = vocab.ids_from_codes(np.arange(256))  # ASCII pieces: one table lookup per byte
    dtype = vocab.id_dtype()

    def encode(codes: np.ndarray) -> np.ndarray:
        ids = byte_table[codes] if codes.dtype == np.uint8 else vocab.ids_from_codes(codes)
        bad = ids < 0
        if bad.any():
            if unknown != "skip":
                missing = [chr(int(c)) for c in np.unique(codes[bad])]
                raise CharlmError(unknown_message(
                    names(), missing, "remove them from the text, drop them with --unknown skip (eval, score), or "
                    "train a new model on it instead of --init-from"))
            ids = ids[~bad]
        return ids.astype(dtype, copy=False)

    return encode


def _encode_into(sink: BinaryIO, sources, vocab, encoding, keep_crlf, separator, unknown,
                 starts: Optional[List[int]] = None) -> tuple:
    """Pass 2: write the ids of every piece to sink. Returns (characters written, CRLFs converted); `starts`
    receives where each file's ids begin."""
    crlf = [0]
    current = [sources[0].name]

    def names():
        return current[0]

    encode = _encoder(vocab, unknown, names)
    sep = _codes(separator) if separator and len(sources) > 1 else np.zeros(0, dtype=np.uint32)
    sep_ids = vocab.ids_from_codes(sep)
    sep_ids = sep_ids[sep_ids >= 0].astype(vocab.id_dtype())  # a fixed vocabulary may lack it: left out
    total = 0
    for i, src in enumerate(sources):
        current[0] = src.name
        if i and sep_ids is not None and len(sep_ids):
            sink.write(sep_ids.tobytes())
            total += len(sep_ids)
        if starts is not None:
            starts.append(total)
        for codes in _file_codes(src, encoding, keep_crlf, crlf):
            ids = encode(codes)
            sink.write(ids.tobytes())
            total += len(ids)
    return total, crlf[0]


def _memmap_ids(path: Path, dtype, length: int) -> np.ndarray:
    """The cached ids in `path`, mapped read-only (numpy cannot map an empty file)."""
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))


# ---------------------------------------------------------------------------------------------- entry points
def build_corpus(sources: Sequence[_Source], name: str, vocab: Optional[Vocabulary] = None, encoding: str = "utf-8",
                 keep_crlf: bool = False, unknown: str = "error", cache_dir=None,
                 separator: str = DOC_SEPARATOR, sha: Optional[tuple] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> CorpusText:
    """Encode sources into a memory-mapped ids file (in cache_dir, else a temporary file that is removed once
    mapped). A cached file for the same bytes and options is mapped instead of re-encoded.

    progress(stage, bytes done, bytes in all) follows the passes over the files: "hashing" (always: the cache
    is keyed by it), then, unless cached, "reading" (the vocabulary) and "encoding"."""
    stage = ["hashing", 0]
    if progress is not None:
        size = sum(src.path.stat().st_size for src in sources if src.path is not None)

        def counted(n: int) -> None:
            stage[1] += n
            progress(stage[0], stage[1], size)

        for src in sources:
            src.counted = counted

    def begin(name: str) -> None:
        stage[0], stage[1] = name, 0

    total_sha, per_file = sha or _sha_of(sources)
    fixed = vocab.chars if vocab else ""
    key = hashlib.sha256(f"{CACHE_VERSION}|{total_sha}|{encoding}|{keep_crlf}|{unknown}|{fixed}|{separator}"
                         .encode()).hexdigest()[:16]
    if cache_dir is not None:
        ids_file, meta_file = Path(cache_dir) / f"ids-{key}.bin", Path(cache_dir) / f"ids-{key}.json"
        if ids_file.is_file() and meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                cached_vocab = Vocabulary(meta["vocab"])
                n = int(meta["chars"])
                if ids_file.stat().st_size == n * np.dtype(cached_vocab.id_dtype()).itemsize:
                    return CorpusText(_memmap_ids(ids_file, cached_vocab.id_dtype(), n), cached_vocab, name, total_sha,
                                      int(meta["crlf"]), per_file, str(ids_file), list(meta["file_starts"]))
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache entry is rebuilt below
    if vocab is None:
        begin("reading")
        vocab, _ = _collect_vocab(sources, encoding, keep_crlf, separator)
    begin("encoding")
    directory = Path(cache_dir) if cache_dir is not None else None
    if directory is not None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            directory = None  # the cache only saves time; a run without it is still correct
    fd, tmp = tempfile.mkstemp(prefix=".ids-", suffix=".tmp", dir=directory)
    starts: List[int] = []
    try:
        with os.fdopen(fd, "wb", buffering=1 << 20) as sink:
            n, crlf = _encode_into(sink, sources, vocab, encoding, keep_crlf, separator, unknown, starts)
        ids = _memmap_ids(Path(tmp), vocab.id_dtype(), n)  # mapped before any rename or unlink: stays valid
        if directory is not None:
            os.replace(tmp, ids_file)
            meta = {"vocab": vocab.chars, "chars": n, "crlf": crlf, "files": per_file, "file_starts": starts}
            write_atomic(meta_file, json.dumps(meta))
        else:
            os.unlink(tmp)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CharlmError(f"cannot write the encoded corpus ({exc.strerror or exc}); free some disk space "
                          f"or run from a writable folder")
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _release_heap()
    return CorpusText(ids, vocab, name, total_sha, crlf, per_file, str(ids_file) if directory is not None else None,
                      starts)


def _release_heap() -> None:
    """Hand the pieces' freed memory back to the system (glibc keeps it otherwise), so that the build's peak
    and the training's do not add up in the resident set. Elsewhere a no-op."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def describe_mapped(corpus: CorpusText) -> dict:
    """What another process needs to map the same cached corpus without reading the text: plain data."""
    return {"ids_file": corpus.ids_file, "vocab": corpus.vocab.chars, "path": corpus.path, "sha256": corpus.sha256,
            "crlf": corpus.crlf_converted, "files": corpus.files, "chars": corpus.chars,
            "file_starts": corpus.file_starts}


def open_mapped(described: dict) -> CorpusText:
    vocab = Vocabulary(described["vocab"])
    ids = _memmap_ids(Path(described["ids_file"]), vocab.id_dtype(), int(described["chars"]))
    return CorpusText(ids, vocab, described["path"], described["sha256"], int(described["crlf"]), described["files"],
                      described["ids_file"], list(described.get("file_starts", [])))


def load_corpus(paths, vocab: Optional[Vocabulary] = None, encoding: str = "utf-8", keep_crlf: bool = False,
                cache_dir=None, unknown: str = "error", separator: str = DOC_SEPARATOR,
                progress: Optional[Callable[[str, int, int], None]] = None) -> CorpusText:
    """Read and encode a corpus: a file, a folder, several files or glob patterns (joined in sorted order with
    `separator`). With cache_dir the ids are kept there, keyed by the files' SHA-256 and the options."""
    inputs = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    files = expand_inputs(inputs)
    sources = [_Source(str(f), path=f) for f in files]
    return build_corpus(sources, describe_inputs(files, inputs), vocab, encoding, keep_crlf, unknown, cache_dir,
                        separator, progress=progress)


def corpus_of_text(text: str, name: str, files: Sequence[Path], kind: str, vocab: Optional[Vocabulary] = None,
                   unknown: str = "error", cache_dir=None) -> CorpusText:
    """A corpus whose text was derived from `files` (already decoded; tags.py's TAG<TAB>TEXT lists keep only
    the text): encoded and cached like any other, keyed by the files' SHA-256 and `kind`, so that it is
    recognised again from the same files read the same way. Its sha256 is that key's digest, not the files'."""
    total, per_file = _sha_of([_Source(str(f), path=f) for f in files])
    total = hashlib.sha256(f"{total}|{kind}".encode()).hexdigest()
    return build_corpus([_Source(name, data=text.encode("utf-8"))], name, vocab, "utf-8", True, unknown, cache_dir,
                        separator="", sha=(total, per_file))


def read_vocab(paths, encoding: str = "utf-8", keep_crlf: bool = False,
               separator: str = DOC_SEPARATOR) -> Vocabulary:
    """The vocabulary load_corpus would find in these files (a read, nothing written): what --init-from
    compares with the model's own before encoding the text under one or the other (grow.py)."""
    inputs = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    sources = [_Source(str(f), path=f) for f in expand_inputs(inputs)]
    return _collect_vocab(sources, encoding, keep_crlf, separator)[0]


def peek_text(paths, encoding: str = "utf-8", keep_crlf: bool = False, separator: str = DOC_SEPARATOR,
              chars: int = 2_000_000) -> str:
    """The first `chars` characters of the files joined by separator, decoded as load_corpus decodes them,
    reading no further: a look at the text before deciding how to encode it (items.files_are_items_likely)."""
    inputs = list(paths) if isinstance(paths, (list, tuple)) else [paths]
    parts, have = [], 0
    for i, f in enumerate(expand_inputs(inputs)):
        if have >= chars:
            break
        if i:
            parts.append(separator)
            have += len(separator)
        src = _Source(str(f), path=f)
        with src.open() as stream:
            for piece in read_text(stream, src.name, encoding, keep_crlf):
                parts.append(piece)
                have += len(piece)
                if have >= chars:
                    break
    return "".join(parts)[:chars]


def decode_corpus(raw: bytes, path, vocab: Optional[Vocabulary] = None, encoding: str = "utf-8",
                  keep_crlf: bool = False, unknown: str = "error", sha: Optional[str] = None) -> CorpusText:
    """Bytes already in memory -> ids in memory (no files): the same decoding and checks as load_corpus."""
    _is_utf8(encoding)
    src = _Source(str(path), data=raw)
    digest = sha or hashlib.sha256(raw).hexdigest()
    if not raw:
        raise CharlmError(f"{path} is empty; give a file with some text in it")
    if vocab is None:
        vocab, _ = _collect_vocab([src], encoding, keep_crlf, "")
    sink = io.BytesIO()
    n, crlf = _encode_into(sink, [src], vocab, encoding, keep_crlf, "", unknown)
    ids = np.frombuffer(sink.getbuffer(), dtype=vocab.id_dtype())[:n].copy()
    return CorpusText(ids, vocab, str(path), digest, crlf, [{"path": str(path), "sha256": digest, "bytes": len(raw)}],
                      file_starts=[0])


def split_train_val(ids: np.ndarray, val_frac: float, path="corpus") -> tuple:
    """The last val_frac of the text is the validation tail, the rest trains (views: nothing is copied).
    Both keep >= 2 characters."""
    n = len(ids)
    n_val = max(2, int(round(n * val_frac)))
    if n - n_val < 2:
        raise CharlmError(
            f"{path} has only {n} character(s); charlm needs at least 4 to train and validate "
            "(and around 100,000 to learn anything useful)"
        )
    return ids[: n - n_val], ids[n - n_val :]
