"""`charlm explain`: how surprised a model is by each character of a text (colours and a legend on the
terminal, or a self-contained HTML page), or what its hidden units track (--neurons, --unit N).
charlm.score and charlm.neurons compute; this module renders (cli/explain_page.py writes the page).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from charlm.cli.common import check
from charlm.cli.display import visible
from charlm.cli.explain_page import SURPRISAL_BINS as BINS, SURPRISAL_COLOURS as COLOURS
from charlm.cli.score import open_source
from charlm.corpus import read_text
from charlm.errors import CharlmError
from charlm.files import write_atomic
from charlm.runs import load_model, text_reading
from charlm.vocab import unknown_message

# How much of a text the terminal shows per unit: a screenful, not the whole file (the HTML page has it all).
UNIT_EXCERPT = 400
ONE_UNIT_EXCERPT = 2000


@dataclass
class ExplainRequest:
    """`charlm explain` as typed: cli/app.py builds one from the options."""
    text: Optional[str]  # the text itself, or
    file: Optional[Path]  # a file to read it from
    checkpoint: Optional[Path]
    encoding: Optional[str]  # None: as the model's training text was read
    keep_crlf: Optional[bool]  # None: as the model's training text was read
    unknown: str  # "error" or "skip"
    html: Optional[Path]  # write a page instead of printing
    neurons: bool
    units: List[int] = field(default_factory=list)  # --unit, in the order given
    device: str = "auto"


def run_explain(r: ExplainRequest, console: Console) -> None:
    from charlm import neurons as nr
    from charlm.score import ScoreChunk, Summary, default_context_id, score_ids

    text, file, unknown, html, neurons, units = r.text, r.file, r.unknown, r.html, r.neurons, list(r.units)
    check((text is None) != (file is None), "give the text to explain as an argument or --file F (one of them)")
    check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    payload, model, vocab, device = load_model(r.checkpoint, r.device)
    encoding, keep_crlf = text_reading(payload, r.encoding, r.keep_crlf)
    if file is not None:
        source, name = open_source(str(file))
        text = "".join(read_text(source, name, encoding, keep_crlf))
        if source is not sys.stdin.buffer:
            source.close()
    else:  # an argument is text already; its line ends follow the same rule as a file's
        name = "the text"
        text = text if keep_crlf else text.replace("\r\n", "\n")
    missing = vocab.unknown(text)
    if missing and unknown == "error":
        raise CharlmError(unknown_message(name, missing))
    if missing:
        text = "".join(c for c in text if c in vocab)
    check(len(text) > 0, f"{name} has no characters the model knows; nothing to explain")
    for u in units:
        problem = nr.check_unit(model, u)
        check(problem is None, problem or "")
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
        from charlm.cli.explain_page import build_page

        units_data = [{"unit": u, "name": label, "corr": r, "values": values[:, k]}
                      for k, (u, label, r) in enumerate(shown)]
        page = build_page(text, scores, vocab.chars, result, str(payload["path"]), units_data,
                          list(nr.FEATURES.items()))
        try:
            write_atomic(html, page)
        except OSError as exc:
            raise CharlmError(f"cannot write {html} ({exc.strerror or exc}); choose a writable path for --html")
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
