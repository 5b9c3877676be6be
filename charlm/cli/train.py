"""The body of `charlm train`: the request, its checks, and the run: plan it (cli/train_plan.py), show what
will be trained, train with the signals caught, show how it ended (cli/train_report.py). Part of the
command-line layer (it prints; the library does not)."""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from charlm.cli.common import check
from charlm.cli.train_plan import TrainPlan, plan_train
from charlm.cli.train_report import end_summary, preview_fn, start_summary
from charlm.model import CELLS


@dataclass
class TrainRequest:
    corpus: Optional[List[Path]]
    named: Optional[str]
    # None for an option not given: a resumed run takes its own value from the checkpoint, a new run the
    # default (settle_options in cli/train_plan.py); the auto-sized ones are chosen by autosize.py.
    encoding: Optional[str]
    keep_crlf: Optional[bool]
    val_frac: Optional[float]
    items: Optional[bool]  # None: recognised by items.looks_like_items
    cell: Optional[str]
    nonlinearity: Optional[str]
    hidden: Optional[int]  # None: chosen by autosize.py
    layers: Optional[int]
    dropout: Optional[float]
    embedding: Optional[int]
    batch_size: Optional[int]
    seq_len: Optional[int]
    lr: Optional[float]
    optimizer: Optional[str]
    weight_decay: Optional[float]
    warmup: Optional[int]
    clip: Optional[float]
    epochs: Optional[float]
    max_steps: Optional[int]
    max_time: Optional[str]
    eval_every: Optional[int]
    eval_chars: Optional[int]
    full_final_eval: Optional[bool]  # None: all of the validation text if it fits 5% of the budget
    patience: int
    seed: Optional[int]
    device: str
    precision: str
    compile_model: bool
    out: Optional[Path]
    resume: bool
    init_from: Optional[Path]
    force: bool
    preview: bool
    # --init-from on a text with characters the model lacks: add them (grow.py), drop them (unknown "skip")
    # or refuse (unknown "error", --no-grow-vocab). A resumed run reads its text as it started (its checkpoint).
    grow_vocab: bool = True
    unknown: Optional[str] = None
    log: Optional[str] = None  # "tensorboard": event files in RUN/tensorboard/ too (charlm/tracking.py)
    tag_by: Optional[str] = None  # "folder", "file" or "field": a tagged corpus (charlm/tags.py)


# The options that shape a run, with where a checkpoint keeps each and its default for a new run (None: chosen
# by autosize.py). A resumed run takes every one it is not given from its checkpoint, and refuses a different
# value: otherwise another --seed or --val-frac would re-split the corpus (text it trained on would become
# validation text) and another --optimizer would not load the saved optimizer state. Limits, patience,


def validate_train(r: TrainRequest) -> None:
    from charlm.train import OPTIMIZERS

    check((not r.corpus) != (r.named is None), "give text files (or a folder) or --corpus NAME, not both; "
           "try: charlm train --corpus python-stdlib")
    for flag, value, least in (("--hidden", r.hidden, 1), ("--layers", r.layers, 1), ("--batch-size", r.batch_size, 1),
                               ("--seq-len", r.seq_len, 1), ("--eval-every", r.eval_every, 1),
                               ("--eval-chars", r.eval_chars, 0),
                               ("--embedding", r.embedding, 0), ("--warmup", r.warmup, 0),
                               ("--patience", r.patience, 0), ("--weight-decay", r.weight_decay, 0)):
        check(value is None or value >= least, f"{flag} must be at least {least}, got {value}")
    check(r.val_frac is None or 0 < r.val_frac < 1, f"--val-frac must be between 0 and 1 (exclusive), got {r.val_frac}")
    check(r.cell is None or r.cell in CELLS, f"--cell must be one of {', '.join(CELLS)}, got {r.cell!r}")
    check(r.nonlinearity is None or r.nonlinearity in ("tanh", "relu"), f"--nonlinearity must be tanh or relu, got {r.nonlinearity!r}")
    check(r.optimizer is None or r.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {r.optimizer!r}")
    check(r.dropout is None or 0 <= r.dropout < 1, f"--dropout must be in [0, 1), got {r.dropout}")
    check(r.lr is None or (r.lr > 0 and math.isfinite(r.lr)), f"--lr must be a positive number, got {r.lr}")
    check(r.clip is None or (r.clip > 0 and math.isfinite(r.clip)), f"--clip must be positive, got {r.clip}")
    check(r.epochs is None or r.epochs > 0, f"--epochs must be positive, got {r.epochs}")
    check(r.max_steps is None or r.max_steps > 0, f"--max-steps must be positive, got {r.max_steps}")
    check(r.unknown in (None, "error", "skip"), f"--unknown must be error or skip, got {r.unknown!r}")
    check(r.log in (None, "tensorboard"), f"--log must be tensorboard, got {r.log!r}")
    from charlm.tags import TAG_BY

    check(r.tag_by in (None, *TAG_BY), f"--tag-by must be one of {', '.join(TAG_BY)}, got {r.tag_by!r}")
    check(not (r.resume and r.init_from), "--resume and --init-from do not mix: resume continues a run, "
           "--init-from starts a new one from a trained model")


def run_train(r: TrainRequest, console: Console) -> None:
    from charlm.runtime import keep_freed_memory, setup_distributed, teardown_distributed
    from charlm.units import parse_duration

    validate_train(r)
    keep_freed_memory()  # a training process reuses its freed activations (8-11% faster steps on a CPU)
    if r.log:  # a missing package is refused before anything is read, probed or written
        from charlm.tracking import require

        require(r.log)
    max_time = parse_duration(r.max_time) if r.max_time else None
    if max_time is None and r.epochs is None and r.max_steps is None:
        max_time = 600.0  # the default budget: ten minutes, good text on a 2-core CPU
    dinfo, device = setup_distributed(r.device)
    if not dinfo.is_main:
        console = Console(stderr=True, quiet=True)
    try:
        run_plan(plan_train(r, max_time, console, dinfo, device), console, dinfo, device)
    finally:
        teardown_distributed()


def run_plan(plan: TrainPlan, console: Console, dinfo, device) -> None:
    """Train what plan_train decided: the start summary, the Trainer under the signal handlers, the end summary."""
    from charlm.cli.display import TrainDisplay, run_summary
    from charlm.runtime import finish_distributed
    from charlm.train import Trainer

    r, out = plan.request, plan.out
    # (the lambda reads the trainer built below when an evaluation calls it)
    preview = _once_per_step(preview_fn(plan.corpus.vocab, device), lambda: trainer.step) if r.preview else None
    display = TrainDisplay(console, preview)
    callbacks = [display]  # and the tracker, once the Trainer is built (it knows the step)

    def each(event: str, data: dict) -> None:
        for callback in callbacks:
            callback(event, data)

    trainer = Trainer(plan.model, plan.train_ids, plan.val_ids, plan.train_config, out, device, plan.meta,
                      callback=each, dist_info=dinfo, resume=plan.payload if r.resume else None,
                      compile_model=r.compile_model, spent=plan.sizing.get("probe_s", 0.0) if not r.resume else 0.0,
                      reshuffle=plan.reshuffle, train_tags=plan.train_tags, val_tags=plan.val_tags)
    run_summary(console, start_summary(plan, trainer, device, dinfo))
    received = []

    def on_signal(signum, frame):
        received.append(signum)
        trainer.request_stop("interrupt")
        if trainer.finishing:  # the final full evaluation: stop it; the checkpoints are already written
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    tracker = _tracker(plan, trainer, preview, device) if r.log and dinfo.is_main else None
    callbacks += [tracker] if tracker else []
    try:
        with display, (tracker or contextlib.nullcontext()):
            result = trainer.run()
    except KeyboardInterrupt:
        if not trainer.finishing:
            raise
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        console.print(f"[bold]stopped[/bold]: interrupted during the final evaluation of the whole validation "
                      f"text; the run is complete and saved in {out}/ (best.pt, last.pt)")
        raise SystemExit(128 + (received[0] if received else signal.SIGINT))
    for s, handler in previous.items():  # after an interrupt, more Ctrl-Cs are ignored until the exit
        signal.signal(s, signal.SIG_IGN if received else handler)
    end_summary(console, result, out, r, received)
    finish_distributed(device)  # every process ends here together: settle gloo's threads before the exit


def _once_per_step(preview, step):
    """The preview sampled once per evaluation, however many callbacks show it (the display, a tracker)."""
    last = {}

    def shared(model) -> list:
        if last.get("step") != step():
            last.update(step=step(), lines=preview(model))
        return last["lines"]

    return shared


def _tracker(plan: TrainPlan, trainer, preview, device):
    """--log tensorboard: charlm/tracking.py's logger, fed by the Trainer's events like the display."""
    from charlm.tracking import TensorBoardLogger

    corpus = plan.corpus
    config = {"model": plan.meta["model_config"], "train": plan.train_config.to_dict(),
              "corpus": {"name": Path(str(corpus.path)).name, "chars": int(len(corpus.ids)), "sha256": corpus.sha256},
              "run": {"device": str(device), "out": str(plan.out)}}
    return TensorBoardLogger(plan.out, config, start_step=trainer.step if plan.request.resume else 0, preview=preview)
