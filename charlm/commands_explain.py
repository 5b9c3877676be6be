"""Command bodies of `charlm score` and `charlm explain`: read the text, call the scoring and neuron
libraries, render what they return (JSON lines, a summary, coloured text, an HTML page).

Part of the command-line layer (cli.py parses, this module runs and renders); charlm.score, charlm.neurons
and charlm.explain_html compute and return values, they print nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from charlm.commands import _check, _load_model, text_reading
from charlm.corpus import read_text
from charlm.display import visible
from charlm.errors import CharlmError
from charlm.explain_html import SURPRISAL_BINS as BINS, SURPRISAL_COLOURS as COLOURS
from charlm.vocab import describe_chars

# How much of a text the terminal shows per unit: a screenful, not the whole file (the HTML page has it all).
UNIT_EXCERPT = 400
ONE_UNIT_EXCERPT = 2000


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
                raise CharlmError(f"{name} has {len(missing)} character(s) the model's vocabulary lacks: "
                                  f"{describe_chars(missing[:20])}{' ...' if len(missing) > 20 else ''} "
                                  f"(first at character {seen + int(np.argmax(bad))}); remove them or pass "
                                  "--unknown skip to drop them")
            ids = ids[~bad]
        seen += len(codes)
        if len(ids):
            yield ids.astype(np.int64)


def _open_source(path: str):
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
def run_score(path: str, checkpoint, encoding: Optional[str], keep_crlf: Optional[bool], unknown: str, streams: int,
              top: int, summary: bool, as_json: bool, device_name: str, console: Console) -> None:
    from charlm.score import Summary, default_context_id, score_ids

    _check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    _check(streams >= 1, f"--streams must be at least 1, got {streams}")
    _check(top >= 0, f"--top must be 0 or more, got {top}")
    _check(not (as_json and not summary), "--json goes with --summary (the per-character output is JSON lines "
           "already)")
    payload, model, vocab, device = _load_model(checkpoint, device_name)
    encoding, keep_crlf = text_reading(payload, encoding, keep_crlf)
    source, name = _open_source(path)
    # stdin is scored in one stream, as it arrives (a pipe's reader sees results before the input ends);
    # a file in parallel warmed streams like eval's.
    ids = _encoded(read_text(source, name, encoding, keep_crlf), vocab, unknown, name)
    chunks = score_ids(model, ids, device, min(top, vocab.size), default_context_id(vocab), vocab,
                       streams=1 if path == "-" else streams)
    tally = Summary(vocab)
    out = sys.stdout
    quoted = [json.dumps(c, ensure_ascii=False) for c in vocab.chars]  # each character as a JSON string, once
    try:
        for chunk in chunks:
            tally.update(chunk)
            if not summary:
                out.write(_json_lines(chunk, quoted))
        if source is not sys.stdin.buffer:
            source.close()
        if tally.chars == 0:
            raise CharlmError(f"{name} has no characters the model knows; nothing to score")
        if summary:
            _print_summary(tally.result(), payload["path"], as_json, out)
        out.flush()
    except BrokenPipeError:  # `charlm score f | head`: the reader left; nothing more to say
        sys.stderr.close()
        raise SystemExit(0)


def run_rank(path: str, checkpoint, encoding: Optional[str], keep_crlf: Optional[bool], unknown: str, as_json: bool,
             device_name: str, console: Console) -> None:
    """Candidate items, one per line, from the most to the least likely under the model: each scored as
    sampling writes an item, from the start of an item through its closing line break (charlm.items), and
    ordered by nats per character so that long and short candidates compare fairly."""
    from charlm.items import score_items

    _check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    payload, model, vocab, device = _load_model(checkpoint, device_name)
    _check("\n" in vocab, "this model has never seen a line break, so it has no items to rank")
    _check("item_end" not in payload.get("corpus", {}), "this model's items are whole files; --rank ranks "
           "candidates one per line, so it needs a model of a list of lines")
    encoding, keep_crlf = text_reading(payload, encoding, keep_crlf)
    source, name = _open_source(path)
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
                raise CharlmError(f"{name} line {n} has character(s) the model's vocabulary lacks: "
                                  f"{describe_chars(missing)}; remove them or pass --unknown skip to drop them")
    scores = score_items(model, vocab, lines, device)
    per_char = [-s / (len(x) + 1) for s, x in zip(scores, lines)]
    order = sorted(range(len(lines)), key=lambda i: per_char[i])
    out = sys.stdout
    if as_json:
        out.write(json.dumps([{"item": lines[i], "logprob": round(float(scores[i]), 4),
                               "nats_per_char": round(per_char[i], 4)} for i in order], ensure_ascii=False) + "\n")
    else:
        out.write("".join(f"{per_char[i]:.3f}\t{scores[i]:.2f}\t{lines[i]}\n" for i in order))
    out.flush()
    console.print(f"[dim]ranked {len(lines):,} candidates: nats per character (lower = more like the training "
                  "text), log-probability, item[/dim]", highlight=False)


def _json_lines(chunk, quoted: list) -> str:
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
def run_explain(text: Optional[str], file: Optional[Path], checkpoint, encoding: Optional[str],
                keep_crlf: Optional[bool], unknown: str, html: Optional[Path], neurons: bool, units: list,
                device_name: str, console: Console) -> None:
    from charlm import neurons as nr
    from charlm.score import ScoreChunk, Summary, default_context_id, score_ids

    _check((text is None) != (file is None), "give the text to explain as an argument or --file F (one of them)")
    _check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    payload, model, vocab, device = _load_model(checkpoint, device_name)
    encoding, keep_crlf = text_reading(payload, encoding, keep_crlf)
    if file is not None:
        source, name = _open_source(str(file))
        text = "".join(read_text(source, name, encoding, keep_crlf))
        if source is not sys.stdin.buffer:
            source.close()
    else:  # an argument is text already; its line ends follow the same rule as a file's
        name = "the text"
        text = text if keep_crlf else text.replace("\r\n", "\n")
    missing = vocab.unknown(text)
    if missing and unknown == "error":
        raise CharlmError(f"{name} has {len(missing)} character(s) the model's vocabulary lacks: "
                          f"{describe_chars(missing[:20])}{' ...' if len(missing) > 20 else ''}; remove them or "
                          "pass --unknown skip to drop them")
    if missing:
        text = "".join(c for c in text if c in vocab)
    _check(len(text) > 0, f"{name} has no characters the model knows; nothing to explain")
    for u in units:
        problem = nr.check_unit(model, u)
        _check(problem is None, problem or "")
    ids = vocab.encode(text)
    context = default_context_id(vocab)
    scores = ScoreChunk.concat(list(score_ids(model, ids, device, min(5, vocab.size), context, vocab)))
    tally = Summary(vocab)
    tally.update(scores)
    result = tally.result()

    shown = []  # (unit, label, {feature: r}) for each unit on display
    ranking = None
    if neurons or units:
        ranking = nr.rank_units(model, ids, nr.text_features(text), device, context)
        per_feature = 3 if html else 1  # the page has a picker: a few candidates per feature
        picks = list(units)
        for f in ranking.features:
            for u in ranking.best(f, per_feature):
                if u not in picks:
                    picks.append(u)
        for u in picks:
            r = {f: float(ranking.corr[k, u]) for k, f in enumerate(ranking.features)}
            shown.append((u, nr.unit_name(model, u), r))
    values = nr.unit_values(model, ids, [u for u, _, _ in shown], device, context) if shown else None

    if html is not None:
        from charlm.explain_html import build_page

        units_data = [{"unit": u, "name": label, "corr": r, "values": values[:, k]}
                      for k, (u, label, r) in enumerate(shown)]
        page = build_page(text, scores, vocab.chars, result, str(payload["path"]), units_data,
                          list(nr.FEATURES.items()))
        _write_atomic(html, page)
        console.print(f"wrote {html}: {len(text):,} characters, {result['bits_per_char']:.3f} bits/char"
                      + (f", {len(shown)} units" if shown else "") + "; open it in a browser")
        return

    out = Console(highlight=False, width=min(Console().width, 80))  # stdout; plain text when not a terminal
    if units:
        for k, u in enumerate(units):
            _show_unit(out, text, values[:, k], shown[k][1], shown[k][2], ONE_UNIT_EXCERPT)
        return
    if neurons:
        out.print(f"[bold]units that track features of this text[/bold] (|Pearson r| over {len(text):,} "
                  "characters; blue = negative, red = positive)")
        for f in ranking.features:
            u = ranking.best(f, 1)[0]
            k = [s[0] for s in shown].index(u)
            _show_unit(out, text, values[:, k], shown[k][1], {f: shown[k][2][f]}, UNIT_EXCERPT)
        absent = [f for f in nr.FEATURES if f not in ranking.features]
        if absent:
            out.print(f"[dim]not in this text: {', '.join(absent)}[/dim]")
        return
    _show_surprisal(out, text, scores, result)


def _write_atomic(path: Path, content: str) -> None:
    tmp = Path(str(path) + ".tmp")
    try:
        tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CharlmError(f"cannot write {path} ({exc.strerror or exc}); choose a writable path for --html")


def _glyph(ch: str) -> str:
    """How a character shows in the terminal: one visible cell (display.visible), a line break also breaking
    the line."""
    return "↵\n" if ch == "\n" else visible(ch)


def _show_surprisal(out: Console, text: str, scores, result: dict) -> None:
    bits = -scores.logprob.astype(np.float64) / math.log(2)  # (n,)
    level = np.searchsorted(BINS, bits, side="right")  # (n,) bin index
    body = Text()
    for ch, b in zip(text, level.tolist()):
        body.append(_glyph(ch), style=f"black on {COLOURS[b]}")
    if out.is_terminal:
        out.print(body, overflow="fold")
        legend = Text("surprisal (bits): ")
        for colour, label in zip(COLOURS, ("<1", "1-2", "2-4", "4-8", ">=8")):
            legend.append(f" {label} ", style=f"black on {colour}")
            legend.append(" ")
        out.print(legend)
    else:  # the text itself, unwrapped, then the figures
        out.file.write(text if text.endswith("\n") else text + "\n")
    out.print(f"{result['chars']:,} characters, {result['bits_per_char']:.3f} bits/char, perplexity "
              f"{result['perplexity']:.2f}", highlight=False)
    if result["surprising_spans"]:
        s = result["surprising_spans"][0]
        out.print(f"most surprising: {escape(repr(visible(s['text'])))} at {s['start']:,} "
                  f"({s['nats_per_char'] / math.log(2):.2f} bits/char)", overflow="ellipsis", no_wrap=True)


def activation_style(value: float, scale: float) -> str:
    """A diverging background: blue for negative, red for positive, white near zero."""
    x = max(-1.0, min(1.0, value / scale))
    fade = int(round(255 * (1 - abs(x))))
    colour = f"#{fade:02x}{fade:02x}ff" if x < 0 else f"#ff{fade:02x}{fade:02x}"
    return f"black on {colour}"


def _show_unit(out: Console, text: str, values: np.ndarray, label: str, corr: dict, limit: int) -> None:
    scale = max(1.0, float(np.abs(values).max(initial=0.0)))  # tanh outputs use [-1, 1]; cell states their range
    rs = ", ".join(f"{f} r={r:+.2f}" for f, r in corr.items())
    out.print(f"\n[bold]{escape(label)}[/bold]: {escape(rs)}", overflow="fold")
    body = Text()
    for ch, v in zip(text[:limit], values[:limit].tolist()):
        body.append(_glyph(ch), style=activation_style(v, scale))
    if not out.is_terminal:  # without colours the text says nothing about the unit: the label is the news
        return
    out.print(body, overflow="fold")
    if len(text) > limit:
        out.print(f"[dim](the first {limit:,} of {len(text):,} characters; --html shows them all)[/dim]")
