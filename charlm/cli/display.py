"""Rendering for the command line: training progress, summaries, sparklines and terminal charts.

Everything here writes to the stderr console it is given, except where a function returns a string.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, List, Optional, Sequence

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from charlm.units import human_count, human_time
from charlm.vocab import describe_chars

SPARKS = "▁▂▃▄▅▆▇█"
# How generated text shows on a terminal: every character one visible cell, as the layout counts it. A raw
# tab would take up to 8 columns and a control character would move the cursor (stdout keeps them raw).
SYMBOLS = {"\n": "↵", "\t": "→", "\r": "␍", "\x7f": "␡"}


def visible(text: str) -> str:
    """text with line breaks, tabs and control characters as visible symbols (U+2400 control pictures),
    other invisible characters as a dot."""
    if text.isprintable():
        return text
    return "".join(_symbol(c) for c in text)


def _symbol(c: str) -> str:
    if c in SYMBOLS:
        return SYMBOLS[c]
    if ord(c) < 0x20:
        return chr(0x2400 + ord(c))
    return c if c.isprintable() or c == " " else "·"


def fits(console: Console) -> bool:
    """Whether lines must fit the console's width: on a terminal. Piped or redirected, a line stays whole,
    for grep and for the log's reader."""
    return console.is_terminal


def say(console: Console, label: str, text: str) -> None:
    """`label: text`, word-wrapped to a terminal's width (the CLI's console does not wrap by itself)."""
    line = Text.assemble((label, "bold"), ":", " " + text if text else "")
    if fits(console):  # at words; a word wider than the terminal is folded
        console.print(line, highlight=False, soft_wrap=False, overflow="fold")
    else:
        console.print(line, highlight=False, soft_wrap=True)


def command_lines(words: Sequence[str], width: int, indent: str = "  ") -> List[str]:
    """A shell command (words already quoted) on lines of at most `width` cells, continued with a backslash
    so that it can be copied and pasted whole. Words are never cut: one longer than a line gets its own."""
    lines, line = [], indent + words[0]
    for word in words[1:]:
        if cell_len(line) + 1 + cell_len(word) + 2 <= width:
            line += " " + word
        else:
            lines.append(line + " \\")
            line = indent * 2 + word
    return lines + [line]


def say_commands(console: Console, label: str, commands: Sequence[Sequence[str]], after: str = "",
                 intro: str = "") -> None:
    """`label: COMMAND | COMMAND after` on one line when it fits the console; otherwise `label: intro` and
    then each command on lines of its own, whole (command_lines): nothing is cut from a command a reader
    will copy."""
    joined = "   |   ".join(" ".join(words) for words in commands)
    if not fits(console) or cell_len(f"{label}: {joined}{after}") <= console.width:
        console.print(Text.assemble((label, "bold"), ": ", joined, after), highlight=False, soft_wrap=True)
        return
    say(console, label, intro)
    for words in commands:
        for line in command_lines(words, console.width):
            console.print(Text(line), highlight=False, soft_wrap=True)


def sparkline(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * (len(SPARKS) - 1) + 0.5))] for v in vals)


def eval_line(r: dict) -> str:
    mark = " *" if r.get("best") else ""
    scored = f"/{human_count(r['val_chars'])}" if r.get("val_chars") else ""
    # fits 80 columns: step, train and validation loss (and how many characters it scored), bits per
    # character, learning rate, speed, time
    train = f"{r['train_loss']:.3f}" if math.isfinite(r["train_loss"]) else "  -  "  # no step taken yet
    return (f"step {r['step']:>5}  train {train}  val {r['val_loss']:.3f}{scored} "
            f"({r['bpc']:.3f} bpc)  lr {r['lr'] if math.isfinite(r['lr']) else 0:.0e}  {human_count(r['chars_per_s'])} ch/s  "
            f"{human_time(r['elapsed_s'])}{mark}")


class TrainDisplay:
    """The training callback: a transient progress bar on a terminal, one permanent line per evaluation,
    and (optionally) a short sample from the model at each evaluation."""

    def __init__(self, console: Console, preview: Optional[Callable[[object], List[str]]] = None):
        self.console = console
        self.preview = preview
        self.live = console.is_terminal
        self.progress = None
        self.task = None
        self._last_draw = 0.0
        self._final_began = 0.0

    def __enter__(self):
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(bar_width=24), TextColumn("{task.fields[where]}"),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} ch/s"),
                TextColumn("ETA {task.fields[eta]}"), TimeElapsedColumn(),
                console=self.console, transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("training", total=1000, where="", loss="-", rate="-", eta="-")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()

    def __call__(self, event: str, data: dict) -> None:
        if event == "step" and self.progress is not None:
            now = time.perf_counter()
            if now - self._last_draw < 0.1:
                return
            self._last_draw = now
            p, elapsed = data["progress"], data["elapsed_s"]
            limits = data["limits"]
            where = f"step {data['step']}" + (f"/{limits['max_steps']}" if "max_steps" in limits else "")
            eta = human_time(elapsed / p - elapsed) if p > 0.002 else "-"
            self.progress.update(self.task, completed=int(p * 1000), where=where, loss=f"{data['loss']:.3f}",
                                 rate=human_count(data["chars_per_s"]), eta=eta)
        elif event == "final_start":  # the final report: a permanent line (piped too), then a bar
            self._final_began = time.perf_counter()
            self.console.print(final_line(data), highlight=False)
            if self.progress is not None:
                self.progress.update(self.task, description="final report", completed=0, where="", loss="-",
                                     rate="-", eta="-")
        elif event == "final_progress" and self.progress is not None:
            done, total = data["done"], max(data["total"], 1)
            spent = time.perf_counter() - self._final_began
            self.progress.update(self.task, completed=int(1000 * done / total), where=f"chunk {done}/{total}",
                                 eta=human_time(spent * (total - done) / done) if done else "-")
        elif event == "cooldown":
            self.console.print(cooldown_line(data), highlight=False, soft_wrap=not fits(self.console))
        elif event == "eval":
            self.console.print(eval_line(data), highlight=False, soft_wrap=not fits(self.console))
            if self.preview is not None:
                for line in self.preview(data["model"]):
                    shown = Text("  " + visible(line), style="dim")
                    shown.truncate(max(20, self.console.width - 1), overflow="ellipsis")  # in cells, not characters
                    self.console.print(shown, highlight=False, soft_wrap=True)


def cooldown_line(data: dict) -> str:
    """'no new best in 3 evaluations: back to step 120 (val 4.392), cooling down over 60 steps from lr 5e-03'."""
    where = (f"back to step {data['best_step']:,} (val {data['best_val']:.3f})" if data["went_back"] else
             "best.pt could not be read, so from the current weights")
    return (f"no new best in {data['evaluations']} evaluations: {where}, cooling down over {data['steps']:,} "
            f"steps from lr {data['lr']:.0e}")


def final_line(data: dict) -> str:
    """'final report: an even sample of 2.0M of 10.2M validation characters in float32 (step 1,200), ~0:04';
    '(step 1,200 and the last, 1,450)' when the last weights are scored beside the sample's best."""
    what = f"all {human_count(data['of'])}" if data["chars"] >= data["of"] else \
        f"an even sample of {human_count(data['chars'])} of {human_count(data['of'])}"
    estimate = f", ~{human_time(data['estimate_s'])}" if (data.get("estimate_s") or 0) >= 1 else ""
    steps = f"step {data['step']:,}" + (f" and the last, {data['last']:,}" if data.get("last") else "")
    return f"final report: {what} validation characters in float32 ({steps}){estimate}"


def run_summary(console: Console, info: dict) -> None:
    """The start-of-run block: corpus, vocabulary, model size, layout, device, and warnings."""
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in info["rows"]:
        table.add_row(key, escape(value))
    console.print(table)
    for warning in info.get("warnings", []):
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False, soft_wrap=not fits(console))


def vocab_preview(chars: str, limit: int = 80) -> str:
    shown = describe_chars(chars[:limit])
    return shown + (f" ... (+{len(chars) - limit})" if len(chars) > limit else "")


def terminal_chart(series: dict, width: int = 64, height: int = 14) -> str:
    """A text plot of named (x, y) series: each series gets its own mark; axes labelled with ranges."""
    marks = "*o+x"
    points = [(x, y) for xs_ys in series.values() for x, y in zip(*xs_ys) if y is not None and math.isfinite(y)]
    if not points:
        return "(nothing to plot yet)"
    xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
    ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
    xspan, yspan = (xmax - xmin) or 1, (ymax - ymin) or 1
    grid = [[" "] * width for _ in range(height)]
    for mark, (name, (xs, ys)) in zip(marks, series.items()):
        for x, y in zip(xs, ys):
            if y is None or not math.isfinite(y):
                continue
            col = int((x - xmin) / xspan * (width - 1) + 0.5)
            row = height - 1 - int((y - ymin) / yspan * (height - 1) + 0.5)
            grid[row][col] = mark
    label_w = 8
    lines = []
    for i, row in enumerate(grid):
        label = f"{ymax:.3f}" if i == 0 else (f"{ymin:.3f}" if i == height - 1 else "")
        lines.append(f"{label:>{label_w}} |" + "".join(row))
    lines.append(" " * label_w + " +" + "-" * width)
    lines.append(" " * label_w + f"  {xmin:<{width // 2}g}{xmax:>{width - width // 2}g}")
    legend = "   ".join(f"{m} {name}" for m, name in zip(marks, series))
    lines.append(" " * label_w + "  " + legend)
    return "\n".join(lines)


# A pass over more characters than this announces itself (a line, and a bar on a terminal): a few seconds
# of scoring for a small model on a 2-core CPU.
ANNOUNCE_CHARS = 1_000_000


@contextlib.contextmanager
def pass_progress(console: Console, what: str, chars: int, unit: str = "characters"):
    """progress(done, total) for a long pass: a permanent line saying what is scored (piped too), and a
    transient bar with its rate and ETA on a terminal. Short passes say nothing. `unit` names what chars
    counts (a file read as it is scored is measured in bytes: its characters are not known in advance)."""
    if chars < ANNOUNCE_CHARS:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console.print(f"{what}: {chars:,} {unit}", highlight=False)
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(bar_width=24), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=1)
        yield lambda done, total: bar.update(task, completed=done, total=total)
