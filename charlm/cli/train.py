"""The body of `charlm train`: resolve the corpus and the run directory, build the model and the Trainer,
render the start and end summaries. Part of the command-line layer (it prints; the library does not)."""

from __future__ import annotations

import math
import shlex
import signal
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import List, Optional

from rich.console import Console

from charlm import checkpoint as ckpt
from charlm.cli.common import check
from charlm.corpus import DOC_SEPARATOR
from charlm.items import ITEM_END
from charlm.errors import CharlmError
from charlm.model import CELLS, CharRNN, ModelConfig
from charlm.train import TrainConfig
from charlm.vocab import Vocabulary


@dataclass
class TrainRequest:
    corpus: Optional[List[Path]]
    named: Optional[str]
    # None for an option not given: a resumed run takes its own value from the checkpoint, a new run the
    # default (settle_options below); the auto-sized ones are chosen by autosize.py.
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


# The options that shape a run, with where a checkpoint keeps each and its default for a new run (None: chosen
# by autosize.py). A resumed run takes every one it is not given from its checkpoint, and refuses a different
# value: otherwise another --seed or --val-frac would re-split the corpus (text it trained on would become
# validation text) and another --optimizer would not load the saved optimizer state. Limits, patience,
# evaluation cadence, device and precision may change: they do not alter what the run has learnt so far.
_TRAIN, _MODEL = TrainConfig(), {f.name: f.default for f in fields(ModelConfig)}  # the defaults, defined once
SHAPING = {  # field: (flag, checkpoint section, key there, default)
    "encoding": ("--encoding", "corpus", "encoding", "utf-8"),
    "keep_crlf": ("--keep-crlf", "corpus", "keep_crlf", False),
    "val_frac": ("--val-frac", "train_config", "val_frac", _TRAIN.val_frac),
    "items": ("--items", "corpus", "items", None),
    "seed": ("--seed", "train_config", "seed", _TRAIN.seed),
    "cell": ("--cell", "model_config", "cell", _MODEL["cell"]),
    "nonlinearity": ("--nonlinearity", "model_config", "nonlinearity", _MODEL["nonlinearity"]),
    "hidden": ("--hidden", "model_config", "hidden", None),
    "layers": ("--layers", "model_config", "layers", None),
    "embedding": ("--embedding", "model_config", "embedding", None),
    "dropout": ("--dropout", "model_config", "dropout", None),
    "lr": ("--lr", "train_config", "lr", _TRAIN.lr),
    "optimizer": ("--optimizer", "train_config", "optimizer", _TRAIN.optimizer),
    "weight_decay": ("--weight-decay", "train_config", "weight_decay", _TRAIN.weight_decay),
    "warmup": ("--warmup", "train_config", "warmup_steps", _TRAIN.warmup_steps),
    "clip": ("--clip", "train_config", "clip", _TRAIN.clip),
    "eval_chars": ("--eval-chars", "train_config", "eval_chars", None),
}
# --init-from keeps the model it starts from: its architecture, not its training options. Dropout may change
# (it is not a weight).
ARCHITECTURE = ("cell", "nonlinearity", "hidden", "layers", "embedding")


def _shown(field: str, value) -> str:
    flag = SHAPING[field][0]
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def settle_options(r: TrainRequest, payload: Optional[dict], source: Optional[Path]) -> tuple:
    """(the request with every shaping option decided, [options a resumed run kept from its checkpoint that
    differ from the defaults]). Refuses, in one line naming the option, a value that contradicts the run
    being resumed or the model being fine-tuned."""
    values, kept = {}, []
    for field, (flag, section, key, default) in SHAPING.items():
        given = getattr(r, field)
        saved = (payload or {}).get(section, {}).get(key) if payload is not None else None
        if r.resume and saved is not None:
            if given is not None and given != saved:
                raise CharlmError(f"{_shown(field, given)} differs from {_shown(field, saved)} of the run in "
                                  f"{source}: a resumed run keeps the options it started with; leave out {flag} "
                                  "to continue it, or drop --resume to start a new run")
            values[field] = saved
            if saved != default and default is not None:
                kept.append(_shown(field, saved))
        elif r.init_from is not None and field in ARCHITECTURE and saved is not None:
            if given is not None and given != saved:
                raise CharlmError(f"{_shown(field, given)} differs from the model in {source} "
                                  f"({_shown(field, saved)}): --init-from fine-tunes that model as it is; leave "
                                  f"out {flag}, or train a new model without --init-from")
            values[field] = saved
        else:
            values[field] = given if given is not None else default
    return replace(r, **values), kept


def _validate_train(r: TrainRequest) -> None:
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
    check(not (r.resume and r.init_from), "--resume and --init-from do not mix: resume continues a run, "
           "--init-from starts a new one from a trained model")


def _runs_of(root: Path, stem: str) -> list:
    dirs = [root / stem] + sorted(root.glob(f"{stem}-*"))
    return [d for d in dirs if (d / ckpt.LAST).is_file() or (d / ckpt.BEST).is_file()]


def _out_dir(r: TrainRequest, stem: str) -> Path:
    root = Path("checkpoints")
    if r.resume:
        if r.out is not None:
            if not (r.out / ckpt.LAST).is_file():
                raise CharlmError(f"--resume: {r.out} holds no last.pt to resume; train without --resume first")
            return r.out
        runs = [d for d in _runs_of(root, stem) if (d / ckpt.LAST).is_file()]
        if not runs:
            raise CharlmError(f"--resume: no previous run of {stem!r} under {root}/; train without --resume first "
                              "(or pass --out RUN_DIR)")
        return max(runs, key=lambda d: (d / ckpt.LAST).stat().st_mtime)
    if r.out is not None:
        if ((r.out / ckpt.LAST).is_file() or (r.out / ckpt.BEST).is_file()) and not r.force:
            raise CharlmError(f"{r.out} already holds a run; add --resume to continue it, --force to start over "
                              "in it, or choose another --out")
        return r.out
    taken = {d.name for d in _runs_of(root, stem)}
    name, n = stem, 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}"
    return root / name


def _prepare_out(out: Path, fresh: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".charlm-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CharlmError(f"cannot write to {out} ({exc.strerror or exc}); choose a writable --out")
    if fresh:
        for name in (ckpt.BEST, ckpt.LAST, "metrics.jsonl"):
            (out / name).unlink(missing_ok=True)


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


def run_train(r: TrainRequest, console: Console) -> None:
    from charlm.corpus import split_train_val
    from charlm.cli.display import TrainDisplay, run_summary
    from charlm.units import parse_duration
    from charlm.runtime import (agreed, finish_distributed, from_main, resolve_precision,
                                seed_everything, setup_distributed, teardown_distributed)
    from charlm.streams import fit_layout
    from charlm.train import Trainer

    _validate_train(r)
    max_time = parse_duration(r.max_time) if r.max_time else None
    if max_time is None and r.epochs is None and r.max_steps is None:
        max_time = 600.0  # the default budget: ten minutes, good text on a 2-core CPU
    dinfo, device = setup_distributed(r.device)
    if not dinfo.is_main:
        console = Console(stderr=True, quiet=True)
    try:
        precision = resolve_precision(r.precision, device)
        inputs = [_named_corpus(r.named, console, dinfo)] if r.named else list(r.corpus)
        stem = r.named or _stem(inputs)
        # Rank 0 decides the run directory and reads the checkpoint; under torchrun every process receives
        # them, so machines that do not share a disk agree on both (or stop on the same error).
        out = from_main(dinfo, lambda: _out_dir(r, stem))
        source = (out / ckpt.LAST) if r.resume else r.init_from
        payload = None
        if r.resume:
            payload = from_main(dinfo, lambda: ckpt.load(out, prefer=ckpt.LAST))
        elif r.init_from is not None:
            payload = from_main(dinfo, lambda: ckpt.load(r.init_from))
        r, kept = settle_options(r, payload, source)
        vocab = Vocabulary(payload["vocab"]) if payload else None
        corpus = _training_corpus(inputs, vocab, r, out.parent / ".charlm-cache", dinfo, console)
        if r.resume:
            saved = payload.get("corpus", {})
            if saved.get("sha256") not in (None, corpus.sha256) and not r.force:
                what = "these files are not the ones" if len(corpus.files) > 1 or len(saved.get("files", [])) > 1 \
                    else f"{corpus.path} is not the corpus"
                raise CharlmError(f"{what} this run was trained on (SHA-256 differs from {saved.get('path')}); "
                                  "resume with the same text, or add --force")
        items_unit, items_reason = _items_mode(r, payload, corpus)
        reshuffle, items_meta, read = None, {"items": False}, {}
        if items_unit == "files":  # the same files joined by ITEM_END instead of a blank line
            read = {"separator": ITEM_END}
            corpus = _training_corpus(inputs, vocab, r, out.parent / ".charlm-cache", dinfo, console, ITEM_END)
        if items_unit:
            train_ids, val_ids, reshuffle, items_meta = _item_split(corpus, r, items_reason,
                                                                    ITEM_END if items_unit == "files" else "\n")
        else:
            train_ids, val_ids = split_train_val(corpus.ids, r.val_frac, corpus.path)
        # Only once the corpus is known good (bad input leaves no directory behind); a failure here ends every
        # process of a torchrun job with the same message.
        agreed(dinfo, lambda: _prepare_out(out, fresh=not r.resume), here=dinfo.is_main)
        mconf, batch, seq_len, sizing = _sizes(r, payload, corpus, train_ids, device, precision, dinfo, max_time)
        batch, seq_len = fit_layout(len(train_ids) - 1, batch, seq_len)
        eval_chars = _eval_chars(r, payload, sizing)
        if dinfo.enabled:
            batch = max(dinfo.world, batch - batch % dinfo.world)
        tconf = TrainConfig(batch_size=batch, seq_len=seq_len, lr=r.lr, warmup_steps=r.warmup,
                            weight_decay=r.weight_decay, optimizer=r.optimizer, clip=r.clip, epochs=r.epochs,
                            max_steps=r.max_steps, max_time=max_time, eval_every=r.eval_every, patience=r.patience,
                            val_frac=r.val_frac, seed=r.seed, precision=precision, eval_chars=eval_chars,
                            full_final_eval=r.full_final_eval)
        seed_everything(r.seed)
        model = CharRNN(mconf)
        if r.init_from is not None:
            model.load_state_dict(payload["model"])
        # How the text was read, so that --novelty and the sampling of items find the same cached ids.
        read = {"encoding": r.encoding, "keep_crlf": r.keep_crlf, "fixed_vocab": vocab is not None, **read}
        meta = {"model_config": mconf.to_dict(), "vocab": corpus.vocab.chars,
                "corpus": {**corpus.info(), **read, **items_meta}, "sizing": sizing}
        display = TrainDisplay(console, preview_fn(corpus.vocab, device) if r.preview else None)
        trainer = Trainer(model, train_ids, val_ids, tconf, out, device, meta, callback=display, dist_info=dinfo,
                          resume=payload if r.resume else None, compile_model=r.compile_model,
                          spent=sizing.get("probe_s", 0.0) if not r.resume else 0.0, reshuffle=reshuffle)

        info = _start_summary(corpus.path, corpus, train_ids, val_ids, model, tconf, device, dinfo, out, r,
                              trainer, sizing, items_meta, kept)
        run_summary(console, info)
        received = []

        def on_signal(signum, frame):
            received.append(signum)
            trainer.request_stop("interrupt")
            if trainer.finishing:  # the final full evaluation: stop it; the checkpoints are already written
                raise KeyboardInterrupt

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with display:
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
    finally:
        teardown_distributed()


def _items_mode(r: TrainRequest, payload, corpus) -> tuple:
    """(None, "lines" or "files"; why). A resumed run keeps its mode; --items/--no-items force it (--items on
    several files makes each file an item, unless their lines pass the rule of a list); otherwise the rule in
    items.py decides from the text (corpora beyond 50M characters are never taken for lists)."""
    from charlm.items import looks_like_items

    if r.resume and payload is not None:
        saved = payload.get("corpus", {})
        if not saved.get("items"):
            return None, ""
        return ("files" if saved.get("item_end") == ITEM_END else "lines"), saved.get("items_reason",
                                                                                     "one item per line")
    if r.items is False:
        return None, "--no-items"
    text = (lambda: corpus.vocab.decode(corpus.ids[:2_000_000])) if corpus.chars <= 50_000_000 else None
    if r.items and len(corpus.files) > 1:
        is_list, why = looks_like_items(text()) if text and "\n" in corpus.vocab else (False, "")
        if is_list:
            return "lines", f"{why} (--items)"
        if ITEM_END in corpus.vocab:
            raise CharlmError(f"a file of {corpus.path} holds the character U+001E, which ends each item of a "
                              "list of files; remove it, or leave out --items")
        return "files", f"{len(corpus.files):,} files, one item per file (--items)"
    if "\n" not in corpus.vocab:
        if r.items:
            raise CharlmError(f"{corpus.path} has no line breaks, so it has no items; leave out --items")
        return None, "no line breaks"
    if r.items:
        return "lines", "one item per line (--items)"
    if text is None:
        return None, "too long for a list"
    is_list, why = looks_like_items(text())
    return ("lines" if is_list else None), why


def _item_split(corpus, r: TrainRequest, reason: str, end: str) -> tuple:
    from charlm.items import Items, epoch_order, split_items

    items = Items.from_ids(corpus.ids, corpus.vocab.chars.index(end))
    if len(items) < 2:
        raise CharlmError(f"{corpus.path} has {len(items)} item(s); a list needs at least 2 (one to validate)")
    train_items, val_items = split_items(items, r.val_frac, r.seed)

    def reshuffle(epoch: int):
        return train_items.text_ids(epoch_order(len(train_items), r.seed, epoch))

    meta = {"items": True, "items_reason": reason, "train_items": len(train_items), "val_items": len(val_items),
            **({"item_end": end} if end != "\n" else {})}
    return train_items.text_ids(), val_items.text_ids(), reshuffle, meta


def _sizes(r: TrainRequest, payload, corpus, train_ids, device, precision, dinfo, max_time) -> tuple:
    """(model config, streams, chunk length, sizing record). Explicit flags win; a resumed run keeps what its
    checkpoint says (it never decides again); everything else is chosen by autosize.py."""
    from charlm import autosize

    saved_train = (payload or {}).get("train_config", {}) if r.resume else {}
    if r.resume:
        sizing = dict(payload.get("sizing") or {})
        return (ModelConfig(**payload["model_config"]), r.batch_size or saved_train.get("batch_size", 64),
                r.seq_len or saved_train.get("seq_len", 128), sizing)
    model_fixed = payload is not None  # --init-from: the model is the checkpoint's
    given = {"hidden": r.hidden, "layers": r.layers, "embedding": r.embedding, "dropout": r.dropout,
             "batch_size": r.batch_size, "seq_len": r.seq_len}
    if model_fixed:
        mc = payload["model_config"]
        given.update(hidden=mc["hidden"], layers=mc["layers"], embedding=mc["embedding"],
                     dropout=r.dropout if r.dropout is not None else mc.get("dropout", 0.0))
    auto = sorted(k for k, v in given.items() if v is None)
    vocab_size = corpus.vocab.size
    speed = None
    if auto and max_time:  # a time budget: how fast is this device for this cell?
        embedding = given["embedding"] if given["embedding"] is not None else autosize.embedding_for(vocab_size)
        speed = autosize.probe(device, r.cell, vocab_size, embedding, precision, dinfo.world,
                               limit_s=min(3.0, 0.05 * max_time))
        speed = _agreed_speed(speed, dinfo)
    choice = autosize.choose(len(train_ids), vocab_size, r.cell, seconds=max_time, steps=r.max_steps,
                             epochs=r.epochs, speed=speed, world=dinfo.world, gpu=device.type == "cuda",
                             fixed=given)
    if model_fixed:  # the checkpoint's architecture, with the dropout the summary names (given or its own)
        mconf = ModelConfig(**{**payload["model_config"], "dropout": choice.dropout})
    else:
        mconf = ModelConfig(vocab_size=vocab_size, cell=r.cell, hidden=choice.hidden, layers=choice.layers,
                            dropout=choice.dropout, nonlinearity=r.nonlinearity, embedding=choice.embedding)
    sizing = {"auto": auto, "choice": choice.to_dict(), "flags": autosize.flags(choice),
              "probe_s": speed.probe_s if speed else 0.0}
    return mconf, choice.batch_size, choice.seq_len, sizing


def _eval_chars(r: TrainRequest, payload, sizing: dict) -> int:
    """--eval-chars if given; a resumed run's own (its evaluations keep scoring the same sample); sized to
    what the run plans to read when anything was chosen for it; else autosize.EVAL_CHARS."""
    from charlm import autosize

    if r.eval_chars is not None:
        return r.eval_chars
    if r.resume and payload is not None:
        return int(payload.get("train_config", {}).get("eval_chars", autosize.EVAL_CHARS))
    if sizing.get("auto") and sizing.get("choice"):
        return autosize.eval_chars(sizing["choice"]["planned_chars"])
    return autosize.EVAL_CHARS


def _agreed_speed(speed, dinfo):
    """Under torchrun every process must size the same model: rank 0's measurement is used by all."""
    if not dinfo.enabled:
        return speed
    import torch.distributed as dist

    box = [speed]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _stem(inputs: List) -> str:
    """The run's name: the file's stem, the folder's name, or the folder several files share."""
    first = Path(inputs[0])
    if len(inputs) == 1:
        return (first.name if first.is_dir() else first.stem) or "corpus"
    parents = {Path(p).resolve().parent for p in inputs}
    return (parents.pop().name if len(parents) == 1 else "") or first.stem or "corpus"


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


def _training_corpus(inputs, vocab, r: TrainRequest, cache: Path, dinfo, console: Console,
                     separator: str = DOC_SEPARATOR):
    """The encoded corpus. Under torchrun the first process of each machine builds (or finds) the cached,
    memory-mapped ids while the others wait; then every process maps that file and reads only the rows it
    trains on. A bad file ends every process with the same one-line message."""
    from charlm.corpus import describe_mapped, load_corpus, open_mapped
    from charlm.runtime import agreed

    def build():
        with CorpusProgress(console) as progress:
            return load_corpus(inputs, vocab, r.encoding, r.keep_crlf, cache_dir=cache, separator=separator,
                               progress=progress)

    if not dinfo.enabled:
        return build()
    corpus = agreed(dinfo, build, here=dinfo.local_rank == 0)
    import torch.distributed as dist

    shared = [None] * dinfo.world
    dist.all_gather_object(shared, describe_mapped(corpus) if corpus is not None else None)
    if corpus is not None:
        return corpus
    mine = shared[dinfo.rank - dinfo.local_rank]  # the first process on this machine
    if mine and mine.get("ids_file") and Path(mine["ids_file"]).is_file():
        return open_mapped(mine)
    return agreed(dinfo, build)  # no shared cache (an unwritable folder): each process encodes its own


def _named_corpus(name: str, console: Console, dinfo) -> Path:
    from charlm import datasets

    from charlm.runtime import agreed

    def fetch():
        from rich.progress import DownloadColumn, Progress, BarColumn, TransferSpeedColumn

        with Progress(f"[bold]downloading {name}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(name, total=None)
            return datasets.corpus_path(name, progress=lambda done, total: bar.update(task, completed=done,
                                                                                      total=total or None))

    path = agreed(dinfo, fetch, here=dinfo.is_main)  # the others wait, and stop with its error if it fails
    return path if path is not None else datasets.corpus_path(name)


def _start_summary(path, corpus, train_ids, val_ids, model, tconf, device, dinfo, out, r, trainer, sizing,
                   items_meta, kept=()) -> dict:
    from charlm.cli.display import vocab_preview
    from charlm.units import human_count, human_time

    mc = model.config
    params = model.num_parameters()
    rows = [
        ("corpus", f"{path}: {corpus.chars:,} characters ({len(train_ids):,} train, {len(val_ids):,} validation)"
                   + (f", {corpus.crlf_converted:,} CRLF -> LF" if corpus.crlf_converted else "")),
        ("vocabulary", f"{corpus.vocab.size} characters: {vocab_preview(corpus.vocab.chars)}"),
        *([("items", f"{items_meta['items_reason']}; {items_meta['train_items']:,} train, {items_meta['val_items']:,} "
                     "validation (a random sample), reshuffled every epoch")] if items_meta.get("items") else []),
        ("model", f"{mc.layers} x {mc.hidden} {mc.cell}{'-' + mc.nonlinearity if mc.cell == 'rnn' else ''}, "
                  f"{'one-hot' if not mc.embedding else f'{mc.embedding}-d embedding'} input, "
                  f"dropout {mc.dropout:g}, {params:,} parameters"),
        ("layout", f"{tconf.batch_size} streams x {tconf.seq_len}-character chunks "
                   f"({trainer.n_chunks:,} steps per epoch)"),
        ("evaluation", _eval_plan(tconf, trainer)),
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
                        f"{trainer.restart.lr:.1e}, where the run had decayed to, to the curve of the new limits")]
          if trainer.restart is not None and trainer.restart.step == trainer.step else []),
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


def _eval_plan(tconf, trainer) -> str:
    from charlm.units import human_count

    when = f"every {tconf.eval_every} steps" if tconf.eval_every else "every 10% of the budget (first after 15 s)"
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
    from charlm.units import human_time

    # Every line fits the terminal: prose wraps at words, commands go on lines of their own (cli/display.py)
    resume = ["charlm"] + [shlex.quote(a) for a in sys.argv[1:] if a != "--resume"] + ["--resume"]
    if result.stopped_by == "nonfinite":
        kept = f"; best.pt is from step {result.best_step}" if result.best_step else "; no checkpoint was written"
        raise CharlmError(f"the loss became NaN or infinite at step {result.step + 1}: training stopped and "
                          f"nothing was overwritten{kept}; lower --lr or --clip and try again")
    vals = [m["val_loss"] for m in result.metrics]
    reasons = {"max_steps": "reached --max-steps", "epochs": "reached --epochs", "max_time": "reached --max-time",
               "patience": f"validation loss stopped improving (--patience {r.patience})", "interrupt": "interrupted"}
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
        best = (f"val loss {bv:.4f} nats/char, {bv / math.log(2):.3f} bpc, perplexity {math.exp(bv):.2f} "
                f"(step {result.best_step}){where}")
        spark = sparkline(vals)
        if not fits(console) or len(f"best: {best}   {spark}") <= console.width:
            say(console, "best", f"{best}   {spark}")
        else:  # the curve on a line of its own, its latest evaluations when there are more than columns
            say(console, "best", best)
            console.print("  " + spark[-max(1, console.width - 3):], highlight=False, soft_wrap=True)
    say(console, "run", f"{out}/ (best.pt, last.pt, metrics.jsonl)")
    say_commands(console, "next", [["charlm", "sample", "-c", shlex.quote(str(out)), "--prime", '"..."'],
                                   ["charlm", "plot", shlex.quote(str(out))]])
    if result.stopped_by == "interrupt":
        say_commands(console, "resume", [resume])
        raise SystemExit(128 + (received[0] if received else signal.SIGINT))
    say_commands(console, "train longer", [resume], " with a larger --max-time, --max-steps or --epochs",
                 "run this with a larger --max-time, --max-steps or --epochs:")


