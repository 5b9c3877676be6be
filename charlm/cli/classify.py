"""`charlm classify`: which tag of a tagged model finds a text most likely. The per-tag losses, ranked, with
each tag's posterior share (equal priors: the softmax of the texts' total log-probabilities); --each line or
paragraph classifies every part of a file on its own. charlm.evaluation computes; this module renders.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm.cli.common import check
from charlm.cli.display import visible
from charlm.cli.score import open_source
from charlm.corpus import read_text
from charlm.errors import CharlmError
from charlm.runs import load_model, text_reading
from charlm.tags import TagSet, no_tags_message
from charlm.vocab import unknown_message

EACH = ("file", "paragraph", "line")


@dataclass
class ClassifyRequest:
    path: str  # a file, or "-" for stdin
    checkpoint: Optional[Path]
    each: str  # "file": the whole text; "paragraph" (blank-line separated) or "line": every part alone
    encoding: Optional[str]
    keep_crlf: Optional[bool]
    unknown: str
    as_json: bool
    device: str


def parts_of(text: str, each: str) -> List[str]:
    if each == "file":
        return [text]
    if each == "line":
        return [x for x in text.split("\n") if x.strip()]
    return [p.strip("\n") for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def run_classify(r: ClassifyRequest, console: Console) -> None:
    from charlm.evaluation import nats_under_tags
    from charlm.score import default_context_id

    check(r.each in EACH, f"--each must be one of {', '.join(EACH)}, got {r.each!r}")
    check(r.unknown in ("error", "skip"), f"--unknown must be error or skip, got {r.unknown!r}")
    payload, model, vocab, device = load_model(r.checkpoint, r.device)
    tags = TagSet.from_payload(payload)
    if tags is None:
        raise CharlmError(no_tags_message(str(payload["path"])) + "; classify compares a tagged model's tags")
    encoding, keep_crlf = text_reading(payload, r.encoding, r.keep_crlf)
    source, name = open_source(r.path)
    text = "".join(read_text(source, name, encoding, keep_crlf))
    if source is not sys.stdin.buffer:
        source.close()
    parts = parts_of(text, r.each)
    if r.unknown == "skip":
        parts = [p for p in ("".join(c for c in x if c in vocab) for x in parts) if p]
    else:
        for n, part in enumerate(parts, 1):
            missing = vocab.unknown(part)
            if missing:
                where = name if r.each == "file" else f"{name} {r.each} {n}"
                raise CharlmError(unknown_message(where, missing))
    if not parts or not any(parts):
        raise CharlmError(f"{name} has no text to classify")
    context = default_context_id(vocab)
    every = list(range(len(tags)))
    nats = nats_under_tags(model, [vocab.encode(p) for p in parts], every, device, context_id=context)  # (P, K)
    results = [_ranked(part, row, tags) for part, row in zip(parts, nats)]
    out = sys.stdout
    if r.each == "file":
        _print_ranking(results[0], r.as_json, out, payload["path"])
    elif r.as_json:
        out.write("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in results))
    else:
        out.write("".join(f"{x['tag']}\t{x['margin']:.3f}\t{visible(x['text'][:70])}\n" for x in results))
        counts = {}
        for x in results:
            counts[x["tag"]] = counts.get(x["tag"], 0) + 1
        shown = ", ".join(f"{escape(t)} {n:,}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        console.print(f"[dim]classified {len(results):,} {r.each}s: tag, nats/char ahead of the next tag, "
                      f"text. By tag: {shown}[/dim]", highlight=False)
    out.flush()


def _ranked(text: str, nats: np.ndarray, tags: TagSet) -> dict:
    """One text's tags from the most to the least likely, with nats/char and posterior shares."""
    chars = max(1, len(text))
    order = np.argsort(nats, kind="stable")
    posterior = np.exp(-(nats - nats.min()))
    posterior /= posterior.sum()
    ranking = [{"tag": tags.names[i], "nats_per_char": round(float(nats[i]) / chars, 4),
                "posterior": round(float(posterior[i]), 4)} for i in order]
    margin = (float(nats[order[1]] - nats[order[0]]) / chars) if len(order) > 1 else math.inf
    return {"text": text, "tag": ranking[0]["tag"], "margin": margin, "ranking": ranking}


def _print_ranking(result: dict, as_json: bool, out, checkpoint) -> None:
    if as_json:
        out.write(json.dumps({"tag": result["tag"], "ranking": result["ranking"], "chars": len(result["text"]),
                              "checkpoint": str(checkpoint)}, ensure_ascii=False) + "\n")
        return
    table = Table(box=None, padding=(0, 2, 0, 0))
    for column, justify in (("rank", "right"), ("tag", "left"), ("nats/char", "right"), ("posterior", "right")):
        table.add_column(column, justify=justify)
    for k, row in enumerate(result["ranking"], 1):
        table.add_row(str(k), escape(row["tag"]), f"{row['nats_per_char']:.4f}", f"{row['posterior']:.1%}")
    Console(file=out, highlight=False).print(table)
