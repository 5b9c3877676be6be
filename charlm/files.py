"""Writing a file so that a reader never sees half of it: every file charlm writes for a user (checkpoints,
metrics, exported models, HTML pages, fetched corpora) goes through here.

The new content goes to a temporary file beside the target, is flushed to disk, gets a plain file's
permissions and then replaces the target in one rename: a crash, a full disk or a Ctrl-C leaves either the
old file or the new one, never a torn one, and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union


@functools.lru_cache(maxsize=None)
def _umask() -> int:
    """The process's umask, read once (reading it means setting it, so not at every save)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends without an exception it replaces
    `path`, otherwise it is removed and `path` is untouched. Errors are the OSErrors of the writing."""
    path = Path(path)
    # the target's suffix last: writers that pick a format by suffix (ONNX, torch.export) see the right one
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the finished file gets the usual mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Union[str, Path], data: Union[bytes, str]) -> None:
    """Write bytes, or text as UTF-8, to `path` through `replacing`."""
    with replacing(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
