"""Experiment tracking: a Trainer callback that writes TensorBoard event files into RUN/tensorboard/, so that
`tensorboard --logdir checkpoints` shows every run side by side while they train.

The Trainer knows nothing of it: it sends its events ("step", "eval", "final") to whatever callback it is
given, and the command line passes this one beside the terminal display. metrics.jsonl stays the source of
truth; these files are a view of the same numbers for the tools people already use.

Scalars: train/loss, train/grad_norm (before clipping), train/lr, train/chars_per_s; val/loss, val/bpc and
time/eval_share at every evaluation; val/final_loss and val/final_bpc from the final report. The run's
configuration goes in as hparams (the HParams tab compares runs by it) and as a text table; the preview
samples as text at each evaluation.

Library code: it writes files and prints nothing. The `tensorboard` package (the optional extra) is imported
only when a logger is made.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, List, Optional

from charlm.errors import CharlmError

SUBDIR = "tensorboard"
# train/* points are the mean over the steps of each such window (each step when a step takes longer):
# 4 scalars cost ~0.35 ms on a loaded 2-core CPU, a tenth of a small model's step; twice a second costs
# nothing and still draws a 10-minute run with 1,200 points
WINDOW_S = 0.5
FLUSH_S = 10  # event files reach the disk this often, for a TensorBoard watching the run live
INSTALL = "pip install 'charlm[tensorboard]'"


LOGGERS = ("tensorboard",)


def require(name: str) -> None:
    """Refuse, before anything is trained or written, a --log its package is missing for."""
    import importlib

    try:
        importlib.import_module("torch.utils.tensorboard")  # which imports the tensorboard package
    except ImportError:
        raise CharlmError(f"--log {name} needs the tensorboard package: {INSTALL}")


def flat_config(sections: dict) -> dict:
    """{"model/hidden": 256, "train/lr": 0.003, ...}: the scalars of each section, None left out (an hparam
    must have a value; a limit not set is simply absent)."""
    out = {}
    for section, values in sections.items():
        for key, value in (values or {}).items():
            if isinstance(value, (bool, int, float, str)):
                out[f"{section}/{key}"] = value
    return out


class TensorBoardLogger:
    """callback(event, data) for the Trainer; close() when the run ends (a context manager does it).

    start_step: the step the run resumes from (0 for a new run). A resumed run appends to its own curves:
    everything its earlier sessions logged after that step (steps trained after the checkpoint it resumes
    from, lost with that session) is purged by TensorBoard's purge_step, so no step appears twice and no
    curve jumps. A new run starts an empty directory (a --force rerun leaves no old curves behind)."""

    def __init__(self, run_dir, config: dict, start_step: int = 0,
                 preview: Optional[Callable[[object], List[str]]] = None, clock: Callable[[], float] = time.monotonic):
        require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(run_dir) / SUBDIR
        self.dir.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
        self.writer = SummaryWriter(str(self.dir), purge_step=start_step + 1 if start_step else None,
                                    flush_secs=FLUSH_S)
        self.preview, self.clock = preview, clock
        self.last_step = start_step
        self._window: list = []  # (loss, grad_norm) of the steps since the last point
        self._window_began = clock()
        self._previous_eval = None  # (clock, eval_s) at the previous evaluation, or the first step
        self._write_config(config, start_step)

    def _write_config(self, config: dict, start_step: int) -> None:
        flat = flat_config(config)
        table = "| option | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in sorted(flat.items()))
        # At the step the session starts from: a resume may change limits, patience, precision, device.
        self.writer.add_text("config", table, start_step)
        if start_step == 0:  # the HParams tab: one entry per run, the metrics it compares runs by
            from torch.utils.tensorboard.summary import hparams

            for summary in hparams(flat, {"val/loss": math.nan, "val/bpc": math.nan}):
                self.writer.file_writer.add_summary(summary)

    # ------------------------------------------------------------------ the callback
    def __call__(self, event: str, data: dict) -> None:
        if event == "step":
            self._step(data)
        elif event == "eval":
            self._eval(data)
        elif event == "final":
            self.writer.add_scalar("val/final_loss", data["loss"], self.last_step)
            self.writer.add_scalar("val/final_bpc", data["loss"] / math.log(2), self.last_step)

    def _step(self, data: dict) -> None:
        now = self.clock()
        if self._previous_eval is None:
            self._previous_eval = (now, 0.0)  # this session's evaluating time starts at 0 (TrainResult.eval_s)
        self.last_step = data["step"]
        self._window.append((data["loss"], data.get("grad_norm", math.nan)))
        if now - self._window_began >= WINDOW_S:
            self._write_window(data)

    def _write_window(self, data: dict) -> None:
        if not self._window:
            return
        step, n = data["step"], len(self._window)
        self.writer.add_scalar("train/loss", sum(loss for loss, _ in self._window) / n, step)
        norms = [g for _, g in self._window if math.isfinite(g)]
        if norms:
            self.writer.add_scalar("train/grad_norm", sum(norms) / len(norms), step)
        self.writer.add_scalar("train/lr", data["lr"], step)
        self.writer.add_scalar("train/chars_per_s", data["chars_per_s"], step)
        self._window, self._window_began = [], self.clock()

    def _eval(self, data: dict) -> None:
        step = data["step"]
        self.last_step = step
        if self._window:  # the steps up to this evaluation: the train curve reaches every val point
            self._write_window(data)
        self.writer.add_scalar("val/loss", data["val_loss"], step)
        self.writer.add_scalar("val/bpc", data["bpc"], step)
        now = self.clock()
        if self._previous_eval is not None and "eval_s" in data:
            began, spent = self._previous_eval
            if now > began:  # the share of the time since the previous evaluation spent evaluating and saving
                self.writer.add_scalar("time/eval_share", (data["eval_s"] - spent) / (now - began), step)
        self._previous_eval = (now, data.get("eval_s", 0.0))
        if self.preview is not None and "model" in data:
            lines = self.preview(data["model"])
            # four spaces: Markdown's code block, so tabs, runs of spaces and line breaks show as sampled
            self.writer.add_text("preview", "\n\n".join("    " + line for line in lines), step)

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
