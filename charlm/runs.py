"""A trained run as the commands and the server meet it: find its checkpoint, build its model, describe it,
read text the way its training text was read, and reopen the corpus it was trained on.

Library code: it returns values and raises CharlmError; the command line and the server render them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from charlm import checkpoint as ckpt
from charlm.corpus import DOC_SEPARATOR
from charlm.errors import CharlmError
from charlm.model import CharRNN, ModelConfig, layer_parameter_counts
from charlm.vocab import Vocabulary


def model_from_payload(payload: dict):
    """(model with weights loaded, vocabulary) from a loaded checkpoint."""
    try:
        config = ModelConfig(**payload["model_config"])
        vocab = Vocabulary(payload["vocab"])
        model = CharRNN(config)
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CharlmError(f"{payload.get('path', 'checkpoint')} does not describe a model this charlm can build "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return model, vocab


def load_model(checkpoint: Optional[Path], device_name: str):
    """(payload, model in eval mode on its device, vocabulary, device) for a checkpoint file or run directory;
    None means the newest run under ./checkpoints."""
    from charlm.runtime import pick_device

    payload = ckpt.load(checkpoint if checkpoint is not None else ckpt.latest_run())
    model, vocab = model_from_payload(payload)
    device = pick_device(device_name)
    return payload, model.to(device).eval(), vocab, device


def text_reading(payload: dict, encoding: Optional[str], keep_crlf: Optional[bool]) -> tuple:
    """(encoding, keep_crlf) to read a text for this model with: what the options say, else how its training
    text was read (the checkpoint's corpus info), so that a CRLF file scores as the model saw its text."""
    info = payload.get("corpus", {})
    return (encoding if encoding is not None else info.get("encoding") or "utf-8",
            keep_crlf if keep_crlf is not None else bool(info.get("keep_crlf", False)))


def model_summary(payload: dict, model, vocab) -> dict:
    """What a model is: `charlm info --json` and the server's GET /v1/model (layers with their parameter
    counts, vocabulary, training configuration and progress, corpus)."""
    rows = layer_parameter_counts(model.config)
    return {
        "checkpoint": str(payload.get("path")), "format": payload.get("format"),
        "charlm_version": payload.get("charlm_version"), "model_config": payload["model_config"],
        "layers": [{"name": n, "shape": s, "parameters": p} for n, s, p in rows],
        "parameters": model.num_parameters(), "vocab_size": vocab.size, "vocab": vocab.chars,
        "train_config": payload.get("train_config", {}), "step": payload.get("step"),
        "epoch": payload.get("epoch"), "best_val_loss": payload.get("best_val_loss"),
        "best_step": payload.get("best_step"), "evaluations": len(payload.get("metrics", [])),
        "corpus": payload.get("corpus", {}),
    }


def training_corpus(payload: dict):
    """The corpus a checkpoint was trained on, mapped from the cache beside its run (encoded if missing), or a
    CharlmError when its files are gone or changed."""
    from charlm.corpus import load_corpus

    info = payload.get("corpus", {})
    files = [Path(f) for f in (info.get("files") or [info.get("path", "")])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CharlmError(f"the training corpus, {missing[0]}, is not there any more")
    cache = Path(payload["path"]).resolve().parent.parent / ".charlm-cache"
    fixed = Vocabulary(payload["vocab"]) if info.get("fixed_vocab") else None
    if info.get("tag_by") == "field":  # the text is what follows each line's tag (tags.py)
        from charlm.tags import load_tagged

        corpus = load_tagged(files, "field", fixed, info.get("encoding", "utf-8"), info.get("keep_crlf", False),
                             cache, info.get("unknown", "error")).corpus
    else:
        corpus = load_corpus(files, fixed, info.get("encoding", "utf-8"), info.get("keep_crlf", False),
                             cache_dir=cache, separator=info.get("separator", DOC_SEPARATOR),
                             unknown=info.get("unknown", "error"))
    if corpus.sha256 != info.get("sha256") or corpus.vocab.chars != payload["vocab"]:
        raise CharlmError(f"{info.get('path')} has changed since training")
    return corpus


@dataclass(frozen=True)
class ItemList:
    """What sampling new items from a model of a list needs to know about that list."""

    end: str  # what ends an item: a line break, or ITEM_END for a list of files
    known: frozenset  # the training list's items: a sample equal to one is a copy, not new
    longest: int  # 99% of the list's items are at most this many characters


def longest_item_kept(listed: Optional[ItemList], min_length: int = 1) -> int:
    """The longest item kept unless asked otherwise: half again the length of 99% of the list's items, 64 at
    least (a longer draw has wandered off; it is dropped, not cut), and never below min_length. Without the
    training list (listed None), 64 or min_length."""
    return max(64, (listed.longest if listed else 0) * 3 // 2, min_length)


def is_item_model(payload: dict) -> bool:
    return bool(payload.get("corpus", {}).get("items"))


def item_list(payload: dict, vocab) -> ItemList:
    """The training list of an item model, read back from its corpus (CharlmError when it is gone)."""
    import numpy as np

    from charlm.items import Items

    end = payload.get("corpus", {}).get("item_end", "\n")
    corpus = training_corpus(payload)
    items = Items.from_ids(corpus.ids, vocab.chars.index(end))
    longest = int(np.percentile(items.lengths_chars(), 99)) if len(items) else 0
    return ItemList(end, frozenset(items.strings(vocab.decode)), longest)
