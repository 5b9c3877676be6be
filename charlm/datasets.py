"""Named corpora: made at run time, never shipped.

    python-stdlib    the ASCII .py files of this Python's standard library, in path order (~4 MB): every
                     Python installation has it, so the first run needs no network
    tinyshakespeare  the 1,115,394-character Shakespeare corpus of the char-rnn experiments, downloaded
                     once into data/ and checked against its SHA-256
"""

from __future__ import annotations

import hashlib
import sysconfig
import urllib.request
from pathlib import Path
from typing import Callable, Optional

from charlm.errors import CharlmError
from charlm.files import write_atomic

STDLIB_BYTES = 4_000_000  # ~4x Tiny Shakespeare: enough text that a 10-minute run barely repeats itself
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

NAMES = {
    "python-stdlib": "this Python's standard-library source, built locally (offline)",
    "tinyshakespeare": "Tiny Shakespeare, 1.1 MB, downloaded once (online)",
}


def build_python_stdlib(dest: Path, limit: int = STDLIB_BYTES) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    parts, size = [], 0
    for file in sorted(root.rglob("*.py")):
        if skip & set(file.relative_to(root).parts):
            continue
        try:
            data = file.read_bytes()
        except OSError:
            continue
        if not data.isascii() or b"\x00" in data:
            continue
        chunk = data.replace(b"\r\n", b"\n").rstrip(b"\n") + b"\n\n\n"
        if size + len(chunk) > limit and parts:
            break
        parts.append(chunk)
        size += len(chunk)
    if not parts:
        raise CharlmError(f"found no Python source under {root} to build the python-stdlib corpus")
    write_atomic(dest, b"".join(parts))
    return dest


def download_shakespeare(dest: Path, progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Download with a progress callback(done_bytes, total_bytes), check the SHA-256, then move into place."""
    try:
        with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
            total = int(response.headers.get("Content-Length") or 0)
            chunks, done = [], 0
            while True:
                block = response.read(1 << 16)
                if not block:
                    break
                chunks.append(block)
                done += len(block)
                if progress:
                    progress(done, total)
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise CharlmError(
            f"could not download Tiny Shakespeare ({reason}); this machine looks offline: "
            f"put the file at {dest} yourself, or use --corpus python-stdlib, which needs no network"
        )
    data = b"".join(chunks)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise CharlmError(f"the downloaded Tiny Shakespeare has SHA-256 {digest[:12]}..., expected "
                          f"{SHAKESPEARE_SHA256[:12]}...; not saved; try again later")
    write_atomic(dest, data)
    return dest


def corpus_path(name: str, data_dir="data", progress=None) -> Path:
    """The file of a named corpus, made or downloaded on first use."""
    if name not in NAMES:
        raise CharlmError(f"unknown corpus {name!r}; named corpora: {', '.join(NAMES)}")
    dest = Path(data_dir) / f"{name}.txt"
    if dest.is_file():
        if name != "tinyshakespeare" or hashlib.sha256(dest.read_bytes()).hexdigest() == SHAKESPEARE_SHA256:
            return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if name == "python-stdlib":
        return build_python_stdlib(dest)
    return download_shakespeare(dest, progress)
