"""What `charlm train` shows besides its step and evaluation lines (cli/display.py): the passes over a large
corpus, the samples each evaluation previews, the start summary (what will be trained, how, for how long) and
the end summary (why it stopped, the best model, what to run next). Part of the command-line layer."""

from __future__ import annotations

import math
import shlex
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape

from charlm.errors import CharlmError
from charlm.vocab import Vocabulary

if TYPE_CHECKING:
    from charlm.cli.train import TrainRequest
    from charlm.cli.train_plan import TrainPlan


def preview_fn(vocab: Vocabulary, device):
    from charlm.cli.display import visible
    from charlm.sample import SampleConfig, sample_text

    def preview(model) -> list:
        lines = []
        for temperature in (0.5, 1.0):
            cfg = SampleConfig(length=90, temperature=temperature, seed=1234)
            text = sample_text(model, vocab, "", cfg, device)[0]
            lines.append(f"T={temperature}: " + visible(text))  # tabs, line breaks: one visible cell each
        return lines

    return preview


class CorpusProgress:
    """The passes over a large corpus's files (hashing, then on first use reading and encoding): a line as
    each begins, piped too, and a transient bar on a terminal. Corpora under ANNOUNCE_BYTES say nothing."""

    ANNOUNCE_BYTES = 64 * 2**20  # about a second per pass on a 2-core CPU
    WHAT = {"hashing": "hashing", "reading": "reading for its vocabulary",
            "encoding": "encoding into the cache (once: later runs map it)"}

    def __init__(self, console: Console):
        self.console, self.stage, self.bar, self.task = console, None, None, None

    def __enter__(self):
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if total < self.ANNOUNCE_BYTES:
            return
        if stage != self.stage:
            self.stage = stage
            self.console.print(f"corpus: {self.WHAT.get(stage, stage)}, {total / 1e6:,.0f} MB", highlight=False)
            if self.console.is_terminal:
                from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

                self.__exit__()
                self.bar = Progress(TextColumn(f"[bold]{stage}"), BarColumn(bar_width=24), DownloadColumn(),
                                    TimeRemainingColumn(), console=self.console, transient=True)
                self.bar.start()
                self.task = self.bar.add_task(stage, total=total)
        if self.bar is not None:
            self.bar.update(self.task, completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def tag_line(tags, tag_by: str) -> str:
    """"3 by folder: dickinson 41%, whitman 35%, yeats 24%": the tags with their share of the text."""
    shares = ", ".join(f"{escape(n)} {share:.0%}" for n, _, share in tags.shares()[:12])
    more = f" and {len(tags) - 12} more" if len(tags) > 12 else ""
    return f"{len(tags)} by {tag_by}: {shares}{more}"


def start_summary(plan: TrainPlan, trainer, device, dinfo) -> dict:
    """The rows and warnings shown before the first step (cli/display.py: run_summary renders them)."""
    from charlm.cli.display import vocab_preview
    from charlm.units import human_count, human_time

    r, corpus, train_ids, val_ids, out = plan.request, plan.corpus, plan.train_ids, plan.val_ids, plan.out
    model, tconf, sizing, items_meta, kept = plan.model, plan.train_config, plan.sizing, plan.items_meta, plan.kept
    path, restart = corpus.path, trainer.schedule.restart
    cooled = trainer.schedule.cooldown if r.resume else None  # a resumed run that had stopped improving
    mc = model.config
    params = model.num_parameters()
    rows = [
        ("corpus", f"{path}: {corpus.chars:,} characters ({len(train_ids):,} train, {len(val_ids):,} validation)"
                   + (f", {corpus.crlf_converted:,} CRLF -> LF" if corpus.crlf_converted else "")),
        ("vocabulary", (plan.vocab_plan and plan.vocab_plan.summary(len(plan.payload["vocab"])))
         or f"{corpus.vocab.size} characters: {vocab_preview(corpus.vocab.chars)}"),
        *([("tags", tag_line(plan.tags, r.tag_by))] if plan.tags is not None else []),
        *([("items", f"{items_meta['items_reason']}; {items_meta['train_items']:,} train, {items_meta['val_items']:,} "
                     "validation (a random sample), reshuffled every epoch")] if items_meta.get("items") else []),
        ("model", f"{mc.layers} x {mc.hidden} {mc.cell}{'-' + mc.nonlinearity if mc.cell == 'rnn' else ''}, "
                  f"{'one-hot' if not mc.embedding else f'{mc.embedding}-d embedding'} input, "
                  f"dropout {mc.dropout:g}, {params:,} parameters"),
        ("layout", f"{tconf.batch_size} streams x {tconf.seq_len}-character chunks "
                   f"({trainer.n_chunks:,} steps per epoch)"),
        ("evaluation", _eval_plan(tconf, trainer, (sizing.get("choice") or {}).get("planned_chars", 0) / max(
            len(train_ids), 1))),
        *_sizing_rows(sizing, r),
        ("device", f"{device} ({tconf.precision})" + (f", {dinfo.world} processes" if dinfo.enabled else "")),
        ("limits", ", ".join(f"{k.replace('_', ' ')} {human_time(v) if k == 'max_time' else v}" for k, v in
                             (("max_time", tconf.max_time), ("max_steps", tconf.max_steps), ("epochs", tconf.epochs))
                             if v) + f", patience {tconf.patience}"),
        ("run", f"{out}" + (" (resumed)" if r.resume else "") + (f" (from {r.init_from})" if r.init_from else "")),
        *([("kept", "the run's own options (from last.pt): "
                    + (" ".join(kept) + "; the rest at their defaults" if kept else "all at their defaults"))]
          if r.resume else []),
        *([("schedule", f"training longer: the rate warms up over {tconf.warmup_steps} steps from "
                        f"{restart.lr:.1e}, where the run had decayed to, to the curve of the new limits")]
          if restart is not None and restart.step == trainer.step else []),
        *([("schedule", f"validation stopped improving and the run began to cool down at step {cooled.step:,}"
                        + ("; it has ended (--patience 0 trains on past it)" if trainer.step >= cooled.end() else
                           f"; the cooldown goes on to step {cooled.end():,}"))] if cooled is not None else []),
    ]
    warnings = []
    if r.batch_size and r.seq_len and (tconf.batch_size, tconf.seq_len) != (r.batch_size, r.seq_len):
        warnings.append(f"the corpus is small: using {tconf.batch_size} streams of {tconf.seq_len}-character chunks "
                        f"instead of {r.batch_size} x {r.seq_len}")
    if corpus.chars < 10_000:
        warnings.append(f"{corpus.chars:,} characters is very little text; expect memorisation rather than style "
                        "(100k+ characters learn far better)")
    ratio = params / max(len(train_ids), 1)
    if "hidden" not in sizing.get("auto", []) and (ratio > 10 or ratio < 0.1):
        advice = "smaller --hidden" if ratio > 10 else "larger --hidden or more --layers"
        warnings.append(f"{human_count(params)} parameters for {human_count(len(train_ids))} training characters "
                        f"(ratio {ratio:.2g}); the rule of thumb is the same order of magnitude: try {advice}")
    if corpus.vocab.size > 1000 and not mc.embedding and "embedding" not in sizing.get("auto", []):
        warnings.append(f"{corpus.vocab.size} distinct characters: --embedding 256 trains faster than one-hot input")
    return {"rows": rows, "warnings": warnings}


def _sizing_rows(sizing: dict, r: TrainRequest) -> list:
    if not sizing.get("auto"):
        return []
    choice = sizing["choice"]
    probe = f" (speed probe {sizing['probe_s']:.1f} s)" if sizing.get("probe_s") else ""
    what = "kept from the run" if r.resume else f"auto ({', '.join(sizing['auto'])})"
    return [("sizing", f"{what}: {choice['reason']}{probe}"), ("repeat with", sizing["flags"])]


def _eval_plan(tconf, trainer, passes: float = 0.0) -> str:
    """The evaluation row; `passes`: how many times the run plans to read its text (0: not planned)."""
    from charlm.units import human_count

    when = f"every {tconf.eval_every} steps" if tconf.eval_every else (
        "after every pass over the text (first after 15 s)" if passes > 10 else
        "every 10% of the budget (first after 15 s)")
    scored, full = trainer.val_sample_chars, trainer.val_full_chars
    bf16 = " in bf16" if tconf.precision == "bf16" else ""
    final = " in float32" if bf16 and trainer.needs_full_pass else ""
    if scored >= full:
        return f"{when}, all {human_count(full)} validation characters{bf16}" + (
            f" (again{final} at the end)" if final else "")
    end = "the same at the end"
    if trainer.needs_full_pass:
        end = f"the whole {human_count(full)}{final} at the end" + (
            "" if tconf.full_final_eval else " if that fits in 5% of the budget, else an even sample that does")
    return f"{when}, a fixed sample of {human_count(scored)} validation characters{bf16} ({end})"


def end_summary(console: Console, result, out: Path, r: TrainRequest, received: list) -> None:
    from charlm.cli.display import fits, say, say_commands, sparkline
    from charlm.evaluation import perplexity
    from charlm.units import human_time

    # Every line fits the terminal: prose wraps at words, commands go on lines of their own (cli/display.py)
    # The same command plus --resume, less --force: what started this run over must not, on resuming it, also
    # waive the check that the corpus is the one it trained on.
    resume = ["charlm"] + [shlex.quote(a) for a in sys.argv[1:] if a not in ("--resume", "--force")] + ["--resume"]
    if result.stopped_by == "nonfinite":
        kept = f"; best.pt is from step {result.best_step}" if result.best_step else "; no checkpoint was written"
        raise CharlmError(f"the loss became NaN or infinite at step {result.step + 1}: training stopped and "
                          f"nothing was overwritten{kept}; lower --lr or --clip and try again")
    vals = [m["val_loss"] for m in result.metrics]
    reasons = {"max_steps": "reached --max-steps", "epochs": "reached --epochs", "max_time": "reached --max-time",
               "patience": f"validation loss stopped improving (--patience {r.patience})", "interrupt": "interrupted"}
    cooled = result.cooldown if result.stopped_by == "patience" else None
    if cooled is not None:
        reasons["patience"] += f" and cooled down from the best over {cooled.steps:,} steps, ending"
    say(console, "stopped", f"{reasons.get(result.stopped_by, result.stopped_by)} at step {result.step} "
        f"(epoch {result.epoch}) after {human_time(result.elapsed_s)}"
        + (f", {result.eval_s / result.elapsed_s:.1%} of it evaluating and saving" if result.elapsed_s > 0
           and result.eval_s else ""))
    if math.isfinite(result.best_val_loss):
        bv = result.best_val_loss
        where = ""
        if result.full_val:  # the periodic passes read a sample; the report reads the whole validation text
            bv = result.full_val["loss"]
            fv = result.full_val
            where = (f" on all {fv['chars']:,} validation characters" if fv["chars"] >= fv.get("of", fv["chars"])
                     else f" ±{fv['se']:.3f} on {fv['chars']:,} of {fv['of']:,} validation characters (an even "
                          "sample: --full-final-eval scores all)")
        ppl = perplexity(bv)
        spec = ".2f" if ppl < 1e6 else ".3g"
        best = (f"val loss {bv:.4f} nats/char, {bv / math.log(2):.3f} bpc, perplexity {ppl:{spec}} "
                f"(step {result.best_step}){where}")
        spark = sparkline(vals)
        if not fits(console) or len(f"best: {best}   {spark}") <= console.width:
            say(console, "best", f"{best}   {spark}")
        else:  # the curve on a line of its own, its latest evaluations when there are more than columns
            say(console, "best", best)
            console.print("  " + spark[-max(1, console.width - 3):], highlight=False, soft_wrap=True)
        other = (result.full_val or {}).get("compared")
        if other and result.best_step == result.step:  # compared, and the last step won: best.pt changed
            say(console, "best.pt", f"the last step's weights: {bv:.4f} on the same characters against "
                f"{other['loss']:.4f} for step {other['step']:,}, the periodic sample's best")
    say(console, "run", f"{out}/ (best.pt, last.pt, metrics.jsonl)")
    say_commands(console, "next", [["charlm", "sample", "-c", shlex.quote(str(out)), "--prime", '"..."'],
                                   ["charlm", "plot", shlex.quote(str(out))]])
    if result.stopped_by == "interrupt":
        say_commands(console, "resume", [resume])
        raise SystemExit(128 + (received[0] if received else signal.SIGINT))
    if result.stopped_by == "patience":  # more of the same text would not help; more text or regularisation may
        say(console, "note", "validation stopped improving: more text, or a higher --dropout, would help more "
            "than a longer run; to train on regardless, resume with --patience 0:")
        given = [a for i, a in enumerate(resume) if a != "--patience" and (i == 0 or resume[i - 1] != "--patience")
                 and not a.startswith("--patience=")]
        say_commands(console, "train on", [given + ["--patience", "0"]])
        return
    say_commands(console, "train longer", [resume], " with a larger --max-time, --max-steps or --epochs",
                 "run this with a larger --max-time, --max-steps or --epochs:")
