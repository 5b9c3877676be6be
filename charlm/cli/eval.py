"""`charlm eval`: a model's loss on a text file of any size (constant memory; --max-chars scores an even
sample and says its standard error); a list model's items are also scored each as one.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm.cli.common import check
from charlm.cli.display import pass_progress
from charlm.corpus import DOC_SEPARATOR
from charlm.errors import CharlmError
from charlm.runs import load_model, text_reading
from charlm.tags import TagSet, no_tags_message, resolve


@dataclass
class EvalRequest:
    """`charlm eval` as typed: cli/app.py builds one from the options."""
    corpus: Path
    checkpoint: Optional[Path]
    encoding: Optional[str]  # None: as the model's training text was read
    unknown: str  # "error" or "skip"
    streams: int
    as_json: bool
    device: str
    keep_crlf: Optional[bool] = None  # None: as the model's training text was read
    max_chars: Optional[int] = None  # score an even sample of this many characters
    tag: Optional[List[str]] = None  # a tagged model: score in this tag's voice (one)
    by_tag: bool = False  # a tagged model: each tag's part of the text in its own voice, beside untagged


def run_eval(r: EvalRequest, console: Console) -> None:
    from charlm.corpus import load_corpus
    from charlm.evaluation import evaluate_text
    from charlm.score import default_context_id

    corpus, unknown, streams, max_chars = r.corpus, r.unknown, r.streams, r.max_chars
    check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    check(streams >= 1, f"--streams must be at least 1, got {streams}")
    check(max_chars is None or max_chars >= 1, f"--max-chars must be at least 1, got {max_chars}")
    check(not (r.tag and len(r.tag) > 1), "eval takes one --tag; --by-tag scores every tag of the text")
    check(not (r.tag and r.by_tag), "give --tag or --by-tag, not both")
    payload, model, vocab, device = load_model(r.checkpoint, r.device)
    if r.by_tag:
        return _eval_by_tag(r, payload, model, vocab, device, console)
    tag_ids = resolve(payload, r.tag)
    if tag_ids:
        model = model.conditioned(tag_ids[0])
    info = payload.get("corpus", {})
    end = info.get("item_end", "\n")  # an item model: each line an item, or each file of a list of files
    encoding, keep_crlf = text_reading(payload, r.encoding, r.keep_crlf)
    text = load_corpus(corpus, vocab, encoding, keep_crlf, unknown=unknown,
                       separator=info.get("separator", DOC_SEPARATOR))
    if text.chars < 2:
        raise CharlmError(f"{corpus} has fewer than 2 known characters; nothing to score")
    scored = min(text.chars - 1, max_chars or text.chars)
    with pass_progress(console, "scoring" if scored == text.chars - 1 else "scoring an even sample", scored) as bar:
        # a sample is spread over at least 64 segments: its standard error needs rows to compare
        report = evaluate_text(model, text.ids, device, streams=max(streams, 64) if max_chars else streams,
                               max_chars=max_chars, progress=bar, context_id=default_context_id(vocab))
    report["checkpoint"] = payload["path"]
    if info.get("items") and end in vocab:
        # a model of a list: each item also scored as one, from the start of an item (as sampling writes)
        from charlm.items import Items, item_context, score_items

        lines = Items.from_ids(text.ids, vocab.chars.index(end)).strings(vocab.decode)
        scores = score_items(model, vocab, lines, device, end=end, context=item_context(payload))
        chars = sum(len(x) + 1 for x in lines)
        report["items"] = {"count": len(lines), "nats_per_item": float(-scores.mean()) if len(lines) else None,
                           "nats_per_char": float(-scores.sum() / max(chars, 1))}
    if r.as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table(show_header=False, box=None)
    sampled = f" ±{report['se']:.4f}" if "se" in report else ""
    chars = f"{report['chars']:,}" + (f" of {report['of']:,} (an even sample)" if "of" in report else "")
    for key, value in (("loss", f"{report['loss']:.4f}{sampled} nats/char"), ("bpc", f"{report['bpc']:.4f} bits/char"),
                       ("perplexity", f"{report['perplexity']:.3f}"), ("chars", chars),
                       ("checkpoint", report["checkpoint"])):
        table.add_row(key, value)
    if report.get("items"):
        it = report["items"]
        table.add_row("items", f"{it['count']:,}: {it['nats_per_item']:.3f} nats per item, "
                               f"{it['nats_per_char']:.4f} nats/char (each from the start of an item)")
    Console().print(table)


def _eval_by_tag(r: EvalRequest, payload, model, vocab, device, console: Console) -> None:
    """--by-tag: the text read with the model's own --tag-by rule (a folder of sub-folders, files named as
    the tags, or TAG<TAB>TEXT lines); each tag's part scored in its own voice and untagged, side by side."""
    from charlm.evaluation import evaluate_text
    from charlm.score import default_context_id
    from charlm.tags import by_tag, load_tagged

    tags = TagSet.from_payload(payload)
    if tags is None:
        raise CharlmError(no_tags_message(str(payload["path"])) + "; --by-tag needs a tagged model")
    info = payload.get("corpus", {})
    encoding, keep_crlf = text_reading(payload, r.encoding, r.keep_crlf)
    tagged = load_tagged([r.corpus], info.get("tag_by", "folder"), vocab, encoding, keep_crlf, unknown=r.unknown,
                         separator=info.get("separator", DOC_SEPARATOR), known=tags.names)
    parts = by_tag(tagged.corpus.ids, tagged.track, len(tags))
    start = default_context_id(vocab)  # every pass starts after the line break (model.start_state)
    rows = []
    total = sum(max(0, len(ids) - 1) for ids in parts.values())
    with pass_progress(console, f"scoring {len(parts)} tags", 2 * total) as bar:
        done = 0

        def scored(voice, ids) -> dict:  # one pass, its share of the bar from `done` on
            nonlocal done
            base, size = done, len(ids) - 1
            step = (lambda d, n: bar(base + d * size // max(n, 1), 2 * total)) if bar else None
            done += size
            return evaluate_text(voice, ids, device, streams=r.streams, progress=step, context_id=start)

        for t, ids in parts.items():
            tagged_loss, plain = scored(model.conditioned(t), ids), scored(model, ids)
            rows.append({"tag": tags.names[t], "chars": tagged_loss["chars"], "loss": tagged_loss["loss"],
                         "bpc": tagged_loss["bpc"], "untagged_loss": plain["loss"]})
    chars = sum(x["chars"] for x in rows)
    report = {"by_tag": rows, "chars": chars, "checkpoint": payload["path"],
              "loss": sum(x["loss"] * x["chars"] for x in rows) / max(chars, 1),
              "untagged_loss": sum(x["untagged_loss"] * x["chars"] for x in rows) / max(chars, 1)}
    if r.as_json:
        sys.stdout.write(json.dumps(report, ensure_ascii=False) + "\n")
        return
    table = Table(box=None, padding=(0, 2, 0, 0))
    for column, justify in (("tag", "left"), ("characters", "right"), ("loss given tag", "right"),
                            ("untagged", "right"), ("gain", "right")):
        table.add_column(column, justify=justify)
    for x in rows + [{"tag": "all", **{k: report[k] for k in ("chars", "loss", "untagged_loss")}}]:
        table.add_row(escape(x["tag"]), f"{x['chars']:,}", f"{x['loss']:.4f}", f"{x['untagged_loss']:.4f}",
                      f"{x['untagged_loss'] - x['loss']:+.4f}")
    Console().print(table)
    console.print("[dim]nats/char; gain: how much lower the loss is given each part's own tag[/dim]")
