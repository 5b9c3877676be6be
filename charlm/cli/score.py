"""`charlm score`: per-character log-probabilities of a text as JSON lines, or --summary (the loss and
the most surprising characters); --rank orders the items of a list by how likely the model finds each.
charlm.score computes; this module reads the text and renders.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm.cli.common import check
from charlm.corpus import read_text
from charlm.cli.display import pass_progress, visible
from charlm.errors import CharlmError
from charlm.runs import load_model, text_reading
from charlm.vocab import unknown_message


@dataclass
class ScoreRequest:
    """`charlm score` as typed: cli/app.py builds one from the options; --rank reads the fields it needs."""
    path: str  # a file, or "-" for stdin
    checkpoint: Optional[Path]
    encoding: Optional[str]  # None: as the model's training text was read
    keep_crlf: Optional[bool]  # None: as the model's training text was read
    unknown: str  # "error" or "skip"
    summary: bool
    top: int
    streams: int
    as_json: bool
    device: str
    rank: bool = False
    tag: Optional[str] = None  # a tagged model: score in this tag's voice


# ============================================================================================== reading
def _encoded(pieces: Iterator[str], vocab, unknown: str, name: str) -> Iterator[np.ndarray]:
    """Id arrays of text pieces; unknown characters are dropped (skip) or named in a one-line error."""
    seen = 0
    for text in pieces:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = vocab.ids_from_codes(codes)
        bad = ids < 0
        if bad.any():
            if unknown == "error":
                missing = [chr(int(c)) for c in np.unique(codes[bad])]
                raise CharlmError(unknown_message(name, missing, at=seen + int(np.argmax(bad))))
            ids = ids[~bad]
        seen += len(codes)
        if len(ids):
            yield ids.astype(np.int64)


def open_source(path: str):
    if path == "-":
        return sys.stdin.buffer, "stdin"
    p = Path(path)
    if not p.exists():
        raise CharlmError(f"{p}: no such file; check the path (or pass - to read stdin)")
    if p.is_dir():
        raise CharlmError(f"{p} is a directory; pass a text file (or - for stdin)")
    try:
        return p.open("rb"), str(p)
    except OSError as exc:
        raise CharlmError(f"{p}: cannot read ({exc.strerror or exc})")


# ============================================================================================== score
def run_score(r: ScoreRequest, console: Console) -> None:
    from charlm.score import Summary, default_context_id, score_ids

    path, unknown, streams, top, summary = r.path, r.unknown, r.streams, r.top, r.summary
    check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    check(streams >= 1, f"--streams must be at least 1, got {streams}")
    check(top >= 0, f"--top must be 0 or more, got {top}")
    check(not (r.as_json and not summary), "--json goes with --summary (the per-character output is JSON lines "
           "already)")
    payload, model, vocab, device = load_model(r.checkpoint, r.device)
    model = _in_voice(model, payload, r.tag)
    encoding, keep_crlf = text_reading(payload, r.encoding, r.keep_crlf)
    source, name = open_source(path)
    # stdin is scored in one stream, as it arrives (a pipe's reader sees results before the input ends);
    # a file in parallel warmed streams like eval's.
    ids = _encoded(read_text(source, name, encoding, keep_crlf), vocab, unknown, name)
    chunks = score_ids(model, ids, device, min(top, vocab.size), default_context_id(vocab), vocab,
                       streams=1 if path == "-" else streams)
    tally = Summary(vocab)
    out = sys.stdout
    quoted = [json.dumps(c, ensure_ascii=False) for c in vocab.chars]  # each character as a JSON string, once
    # --summary on a large file: nothing reaches stdout until the end, so stderr says what is being scored
    # (in bytes: the characters are counted as they are read). Per-character output shows its own progress.
    size = Path(path).stat().st_size if summary and path != "-" else 0
    try:
        with pass_progress(console, "scoring", size, unit="bytes") as bar:
            for chunk in chunks:
                tally.update(chunk)
                if not summary:
                    out.write(json_lines(chunk, quoted))
                elif bar is not None:
                    bar(source.tell(), size)
        if source is not sys.stdin.buffer:
            source.close()
        if tally.chars == 0:
            raise CharlmError(f"{name} has no characters the model knows; nothing to score")
        if summary:
            _print_summary(tally.result(), payload["path"], r.as_json, out)
        out.flush()
    except BrokenPipeError:  # `charlm score f | head`: the reader left; nothing more to say
        sys.stderr.close()
        raise SystemExit(0)


def run_rank(r: ScoreRequest, console: Console) -> None:
    """Candidate items, one per line, from the most to the least likely under the model: each scored as
    sampling writes an item, from the start of an item through its closing line break (charlm.items), and
    ordered by nats per character so that long and short candidates compare fairly."""
    from charlm.items import item_context, score_items

    unknown = r.unknown
    check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    payload, model, vocab, device = load_model(r.checkpoint, r.device)
    model = _in_voice(model, payload, r.tag)
    check("\n" in vocab, "this model has never seen a line break, so it has no items to rank")
    check("item_end" not in payload.get("corpus", {}), "this model's items are whole files; --rank ranks "
           "candidates one per line, so it needs a model of a list of lines")
    encoding, keep_crlf = text_reading(payload, r.encoding, r.keep_crlf)
    source, name = open_source(r.path)
    text = "".join(read_text(source, name, encoding, keep_crlf))
    if source is not sys.stdin.buffer:
        source.close()
    lines = [x for x in text.split("\n") if x]
    if not lines:
        raise CharlmError(f"{name} has no lines to rank; give one candidate per line")
    if unknown == "skip":
        lines = [x for x in ("".join(c for c in line if c in vocab) for line in lines) if x]
    else:
        for n, line in enumerate(lines, 1):
            missing = vocab.unknown(line)
            if missing:
                raise CharlmError(unknown_message(f"{name} line {n}", missing))
    scores = score_items(model, vocab, lines, device, context=item_context(payload))
    per_char = [-s / (len(x) + 1) for s, x in zip(scores, lines)]
    order = sorted(range(len(lines)), key=lambda i: per_char[i])
    out = sys.stdout
    if r.as_json:
        out.write(json.dumps([{"item": lines[i], "logprob": round(float(scores[i]), 4),
                               "nats_per_char": round(per_char[i], 4)} for i in order], ensure_ascii=False) + "\n")
    else:
        out.write("".join(f"{per_char[i]:.3f}\t{scores[i]:.2f}\t{lines[i]}\n" for i in order))
    out.flush()
    console.print(f"[dim]ranked {len(lines):,} candidates: nats per character (lower = more like the training "
                  "text), log-probability, item[/dim]", highlight=False)


def _in_voice(model, payload: dict, tag: Optional[str]):
    """The model conditioned on --tag (a tagged model), or as it is."""
    from charlm.tags import resolve

    ids = resolve(payload, [tag] if tag is not None else None)
    return model.conditioned(ids[0]) if ids else model


def json_lines(chunk, quoted: list) -> str:
    lines = []
    for j, (i, lp, rank, tids, tps) in enumerate(zip(chunk.ids.tolist(), chunk.logprob.tolist(), chunk.rank.tolist(),
                                                   chunk.top_ids.tolist(), chunk.top_p.tolist())):
        top = ", ".join(f"[{quoted[t]}, {p:.6g}]" for t, p in zip(tids, tps))
        lines.append(f'{{"i": {chunk.start + j}, "char": {quoted[i]}, "logprob": {lp:.6g}, "rank": {rank}, '
                     f'"top": [{top}]}}\n')
    return "".join(lines)


def _print_summary(result: dict, checkpoint: str, as_json: bool, out) -> None:
    result = {**result, "checkpoint": checkpoint}
    if as_json:
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        return
    table = Table(show_header=False, box=None)
    for key, value in (("characters", f"{result['chars']:,}"), ("total", f"{result['nats']:.2f} nats"),
                       ("loss", f"{result['nats_per_char']:.4f} nats/char"),
                       ("bpc", f"{result['bits_per_char']:.4f} bits/char"),
                       ("perplexity", f"{result['perplexity']:.3f}"), ("checkpoint", checkpoint)):
        table.add_row(key, escape(value))
    console = Console(file=out, highlight=False)
    console.print(table)
    if result["surprising_spans"]:
        console.print("most surprising spans (bits/char, start, text):")
        for s in result["surprising_spans"]:
            console.print(f"  {s['nats_per_char'] / math.log(2):5.2f}  {s['start']:>9,}  "
                          f"{escape(visible(s['text']))}", overflow="ellipsis", no_wrap=True)


# ============================================================================================== explain
