"""`charlm info`: what a checkpoint holds (its layers, vocabulary, training), and `charlm plot`: its
learning curves, drawn on the terminal or written as a PNG (matplotlib, the `plot` extra).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm import checkpoint as ckpt
from charlm.errors import CharlmError
from charlm.runs import model_from_payload, model_summary
from charlm.tags import TagSet
from charlm.vocab import describe_chars


def run_info(path: Optional[Path], as_json: bool, console: Console) -> None:
    payload = ckpt.load(path if path is not None else ckpt.latest_run())
    model, vocab = model_from_payload(payload)
    summary = model_summary(payload, model, vocab)
    metrics = payload.get("metrics", [])
    rows = [(layer["name"], layer["shape"], layer["parameters"]) for layer in summary["layers"]]
    total = summary["parameters"]
    if as_json:
        sys.stdout.write(json.dumps(summary, ensure_ascii=False) + "\n")
        return
    out = Console()
    table = Table(title=f"charlm model: {payload['path']}", title_justify="left")
    table.add_column("layer")
    table.add_column("input -> output")
    table.add_column("parameters", justify="right")
    for name, shape, count in rows:
        table.add_row(name, shape, f"{count:,}")
    table.add_section()
    table.add_row("total", "", f"{total:,}")
    out.print(table)
    best = summary["best_val_loss"]
    tc = summary["train_config"]
    lines = [
        f"vocabulary: {vocab.size} characters: {describe_chars(vocab.chars[:100])}{' ...' if vocab.size > 100 else ''}",
        f"training: step {summary['step']}, epoch {summary['epoch']}, {len(metrics)} evaluations"
        + (f", best val loss {best:.4f} nats/char ({best / math.log(2):.3f} bpc) at step {summary['best_step']}"
           if isinstance(best, float) and math.isfinite(best) else ""),
        "config: " + ", ".join(f"{k}={v}" for k, v in tc.items()),
        f"corpus: {summary['corpus'].get('path')} ({summary['corpus'].get('chars', 0):,} characters, "
        f"sha256 {str(summary['corpus'].get('sha256', ''))[:12]}...)",
    ]
    corpus = summary["corpus"]
    if corpus.get("added_chars"):  # a fine-tune whose vocabulary grew (--init-from)
        added = corpus["added_chars"]
        lines.append(f"grown: {len(added)} character(s) added on --init-from: {describe_chars(added[:40])}"
                     + (" ..." if len(added) > 40 else ""))
    if corpus.get("dropped_chars"):
        lines.append(f"dropped: {len(corpus['dropped_chars'])} character(s) left out of the text "
                     f"(--unknown skip): {describe_chars(corpus['dropped_chars'][:40])}")
    tags = TagSet.from_payload(payload)
    if tags is not None:  # a tagged model: what `sample --tag` takes, with each tag's share of the text
        lines.append(f"tags: {len(tags)} by {corpus.get('tag_by')} (sample --tag NAME; charlm classify FILE)")
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
    if tags is not None:
        listed = Table(box=None, show_header=True, padding=(0, 2, 0, 0))
        for column, justify in (("tag", "left"), ("characters", "right"), ("share", "right")):
            listed.add_column(column, justify=justify)
        for name, chars, share in tags.shares():
            listed.add_row(escape(name), f"{chars:,}", f"{share:.1%}")
        out.print(listed)


def run_plot(run_dir: Optional[Path], output: Optional[Path], console: Console) -> None:
    from charlm.cli.display import terminal_chart

    run_dir = run_dir if run_dir is not None else ckpt.latest_run()
    metrics_file = Path(run_dir) / "metrics.jsonl"
    if not metrics_file.is_file():
        raise CharlmError(f"{run_dir} has no metrics.jsonl; pass a run directory written by charlm train")
    records = []
    for n, line in enumerate(metrics_file.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise CharlmError(f"{metrics_file} line {n} is not JSON; the file is damaged")
    if not records:
        raise CharlmError(f"{metrics_file} is empty: no evaluation has run yet")
    steps = [m["step"] for m in records]
    train, val = [m["train_loss"] for m in records], [m["val_loss"] for m in records]
    if output is None:
        sys.stdout.write(terminal_chart({"train": (steps, train), "val": (steps, val)}) + "\n")
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharlmError("PNG plots need matplotlib: pip install 'charlm[plot]' (or leave out -o for a "
                          "terminal chart)")
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, train, label="train")
    ax.plot(steps, val, label="validation")
    ax.set_xlabel("step")
    if all("chars" in m for m in records) and records[-1]["chars"] and records[-1]["step"]:
        per_step = records[-1]["chars"] / records[-1]["step"]  # characters seen, on a second axis
        top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda c: c / per_step))
        top.set_xlabel("training characters seen")
    ax.set_ylabel("loss (nats/char)")
    ax.set_title(str(run_dir))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(output, dpi=120)
    except OSError as exc:
        raise CharlmError(f"cannot write {output} ({exc.strerror or exc})")
    console.print(f"wrote {output}")
