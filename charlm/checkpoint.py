"""Checkpoints: one self-contained file of plain tensors and primitives, written atomically, read safely.

Contents (FORMAT 1; persist.payload builds them): format, charlm_version, model_config, train_config, vocab (the characters as one
string), model (state_dict), optimizer (state_dict), step, epoch, cursor (next chunk), carried_state (list of
tensors), rng (torch generator states), elapsed_s, best_val_loss, best_step, bad_evals, metrics (one dict
per evaluation) and corpus (path, sha256, chars). Loading uses torch.load(weights_only=True), which refuses
anything that would run code when unpickled. `load` also reads a model exported as a safetensors folder
(hub.py), so that every command taking a checkpoint takes one.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from charlm import __version__, hub
from charlm.errors import CharlmError
from charlm.files import replacing

FORMAT = 1
BEST, LAST = "best.pt", "last.pt"


def save(payload: dict, path) -> None:
    """Write through files.replacing (a temporary file beside `path`, fsync, one rename): a crash, a full disk or a second
    Ctrl-C leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    payload = {"format": FORMAT, "charlm_version": __version__, **payload}
    try:
        with replacing(path) as tmp, open(tmp, "wb") as f:
            torch.save(payload, f)
    except OSError as exc:
        raise CharlmError(f"could not write {path} ({exc.strerror or exc}); the previous file is untouched")


def resolve(path, prefer: str = BEST) -> Path:
    """A checkpoint file from a file or run-directory path (a directory gives `prefer`, else the other)."""
    p = Path(path)
    if p.is_dir():
        for name in (prefer, LAST if prefer == BEST else BEST):
            if (p / name).is_file():
                return p / name
        raise CharlmError(f"{p} holds no checkpoint ({BEST} or {LAST}) or exported model (config.json, "
                          "model.safetensors); train into it first, or pick a run dir")
    if not p.exists():
        raise CharlmError(f"{p}: no such checkpoint file or run directory")
    return p


def latest_run(root="checkpoints") -> Path:
    """The run directory under root whose checkpoint was written most recently."""
    root = Path(root)
    found = [f for pattern in (f"*/{BEST}", f"*/{LAST}", BEST, LAST) for f in root.glob(pattern)]
    if not found:
        raise CharlmError(
            f"no trained model under ./{root}; run `charlm train FILE` first or pass --checkpoint PATH"
        )
    return max(found, key=lambda f: f.stat().st_mtime).parent


def load(path, prefer: str = BEST, map_location="cpu") -> dict:
    """Read and validate a checkpoint, or an exported safetensors folder (hub.py: the same entries but the
    training state); a CharlmError for anything missing, torn, foreign or unsafe."""
    p = Path(path)
    # every command taking -c reads a folder through here; a run directory's own checkpoints come first
    if hub.is_folder(p) and not (p / BEST).is_file() and not (p / LAST).is_file():
        return hub.read_folder(p)
    file = resolve(path, prefer)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc) or "Unsupported global" in str(exc):  # it names a callable to import
            raise CharlmError(
                f"{file} was refused: it contains objects that would run code when loaded; "
                "charlm only reads its own plain-data checkpoints"
            )
        raise CharlmError(f"{file} is not a charlm checkpoint (unreadable: corrupt or another format)")
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, IndexError) as exc:
        if isinstance(exc, PermissionError):
            raise CharlmError(f"{file}: permission denied")
        raise CharlmError(f"{file} is truncated or corrupt ({type(exc).__name__}); use the other checkpoint in its run dir")
    except Exception as exc:  # torn bytes reach the legacy unpickler, which fails as struct.error, TypeError, ...
        kind = type(exc).__name__ if type(exc).__module__ == "builtins" else f"{type(exc).__module__}.{type(exc).__name__}"
        raise CharlmError(f"{file} is truncated or corrupt ({kind}); use the other checkpoint in its run dir")
    if not isinstance(payload, dict) or "format" not in payload or "model" not in payload:
        raise CharlmError(f"{file} is not a charlm checkpoint (no format/model entries)")
    if not isinstance(payload["format"], int) or payload["format"] > FORMAT:
        raise CharlmError(
            f"{file} has checkpoint format {payload['format']}, written by a newer charlm "
            f"({payload.get('charlm_version', '?')}); this charlm {__version__} reads format <= {FORMAT}: "
            "upgrade charlm (pip install -U charlm)"
        )
    for key in ("model_config", "vocab"):
        if key not in payload:
            raise CharlmError(f"{file} is not a complete charlm checkpoint (no {key})")
    payload["path"] = str(file)
    return payload


def clean_state_dict(state_dict: dict) -> dict:
    """Strip the wrappers' prefixes (DDP's `module.`, torch.compile's `_orig_mod.`) so checkpoints load
    anywhere."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out
