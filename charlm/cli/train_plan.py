"""Planning `charlm train`: everything decided before the first step. The options a resumed or fine-tuned
run keeps, the run directory, the corpus (read, cached, split; a list of items recognised), the sizes
(autosize.py), the configs and the model: one TrainPlan, which cli/train.py then runs. Part of the
command-line layer: the corpus passes and the download show progress on the terminal (cli/train_report.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import numpy as np
from rich.console import Console

from charlm import checkpoint as ckpt
from charlm import persist
from charlm.cli.train_report import CorpusProgress
from charlm.corpus import DOC_SEPARATOR
from charlm.errors import CharlmError
from charlm.items import ITEM_END, files_are_items_likely
from charlm.grow import grow_state_dict, grow_tags
from charlm.model import CharRNN, ModelConfig
from charlm.train import TrainConfig
from charlm.vocab import Vocabulary

if TYPE_CHECKING:
    from charlm.cli.train import TrainRequest

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
    "tag_by": ("--tag-by", "corpus", "tag_by", None),
    "seed": ("--seed", "train_config", "seed", _TRAIN.seed),
    "cell": ("--cell", "model_config", "cell", _MODEL["cell"]),
    "nonlinearity": ("--nonlinearity", "model_config", "nonlinearity", _MODEL["nonlinearity"]),
    "hidden": ("--hidden", "model_config", "hidden", None),
    "layers": ("--layers", "model_config", "layers", None),
    "embedding": ("--embedding", "model_config", "embedding", None),
    "dropout": ("--dropout", "model_config", "dropout", None),
    "lr": ("--lr", "train_config", "lr", _TRAIN.lr),
    "optimizer": ("--optimizer", "train_config", "optimizer", _TRAIN.optimizer),
    "weight_decay": ("--weight-decay", "train_config", "weight_decay", None),  # None: autosize decides
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


@dataclass
class TrainPlan:
    """What `charlm train` decided before training; nothing here has trained yet."""

    request: TrainRequest  # every shaping option settled (settle_options)
    kept: list  # the options a resumed run kept from its checkpoint that differ from the defaults
    out: Path  # the run directory, prepared (writable; a new run's old files removed)
    payload: Optional[dict]  # the checkpoint resumed (--resume) or fine-tuned from (--init-from)
    corpus: object  # corpus.CorpusText
    train_ids: np.ndarray
    val_ids: np.ndarray
    reshuffle: Optional[Callable[[int], np.ndarray]]  # a list of items: the training text of each epoch
    items_meta: dict  # {"items": False}, or how the list was recognised and split
    sizing: dict  # what autosize.py chose and why (the summary's "sizing" and "repeat with" rows)
    train_config: TrainConfig
    model: CharRNN  # seeded and built (with the --init-from weights)
    meta: dict  # what every checkpoint of the run records besides the training state
    vocab_plan: Optional[object] = None  # --init-from: grow.VocabPlan (characters added or dropped)
    tags: Optional[object] = None  # a tagged corpus: tags.TagSet (names in id order, characters of each)
    train_tags: Optional[np.ndarray] = None  # the tag track of train_ids (a list's: of each epoch's text)
    val_tags: Optional[np.ndarray] = None


def plan_train(r: TrainRequest, max_time: Optional[float], console: Console, dinfo, device) -> TrainPlan:
    """Decide the run. Under torchrun every process plans the same run: rank 0 decides the run directory and
    reads the checkpoint, every process receives them (machines need not share a disk), and a failure ends
    every process with the same line."""
    from charlm.corpus import split_train_val
    from charlm.runtime import agreed, from_main, resolve_precision, seed_everything
    from charlm.streams import fit_layout

    precision = resolve_precision(r.precision, device)
    inputs = [_named_corpus(r.named, console, dinfo)] if r.named else list(r.corpus)
    stem = r.named or persist.run_name(inputs)
    # Rank 0 decides the run directory and reads the checkpoint; under torchrun every process receives
    # them, so machines that do not share a disk agree on both (or stop on the same error).
    out = from_main(dinfo, lambda: persist.run_dir(stem, r.out, r.resume, r.force))
    source = (out / ckpt.LAST) if r.resume else r.init_from
    payload = None
    if r.resume:
        payload = from_main(dinfo, lambda: ckpt.load(out, prefer=ckpt.LAST))
    elif r.init_from is not None:
        payload = from_main(dinfo, lambda: ckpt.load(r.init_from))
    r, kept = settle_options(r, payload, source)
    vocab = Vocabulary(payload["vocab"]) if payload else None
    # Encoded once, joined as it will be trained: a folder that becomes one item per file by ITEM_END, other
    # text by a blank line. Guessed before encoding (a resumed run knows; items.files_are_items_likely) and
    # decided on the encoded text below; a wrong guess, or a text the guess cannot be checked on, reads again.
    saved_end = (payload or {}).get("corpus", {}).get("item_end") if r.resume else None
    separator = ITEM_END if saved_end == ITEM_END or (not r.resume and r.items and r.tag_by != "field" and
                                                      files_are_items_likely(inputs, r.encoding, r.keep_crlf)) \
        else DOC_SEPARATOR
    tagging = _tagging(r, payload, source)  # {} for untagged text; else what load_tagged is told
    vplan = None
    if r.init_from is not None:  # the text's characters against the model's: grow, drop or refuse (grow.py)
        vplan = from_main(dinfo, lambda: _vocab_plan(r, inputs, vocab, separator))
        vocab, r = vplan.vocab, replace(r, unknown=vplan.unknown)
    elif r.resume:  # read the text as the run did (a run that dropped new characters drops them again)
        r = replace(r, unknown=payload.get("corpus", {}).get("unknown", "error"))
    corpus = _training_corpus(inputs, vocab, r, out.parent / ".charlm-cache", dinfo, console, separator, tagging)
    if r.resume:
        saved = payload.get("corpus", {})
        if saved.get("sha256") not in (None, corpus.sha256) and not r.force:
            what = "these files are not the ones" if len(corpus.files) > 1 or len(saved.get("files", [])) > 1 \
                else f"{corpus.path} is not the corpus"
            raise CharlmError(f"{what} this run was trained on (SHA-256 differs from {saved.get('path')}); "
                              "resume with the same text, or add --force")
    items_unit, items_reason = _items_mode(r, payload, corpus, separator)
    if items_reason is None:  # joined by ITEM_END the text cannot tell (a file holds U+001E): by a blank line
        separator = DOC_SEPARATOR
        corpus = _training_corpus(inputs, vocab, r, out.parent / ".charlm-cache", dinfo, console, separator, tagging)
        items_unit, items_reason = _items_mode(r, payload, corpus, separator)
    if (items_unit == "files") != (separator == ITEM_END):  # the guess was wrong: the files joined the other way
        separator = ITEM_END if items_unit == "files" else DOC_SEPARATOR
        corpus = _training_corpus(inputs, vocab, r, out.parent / ".charlm-cache", dinfo, console, separator, tagging)
    reshuffle, items_meta = None, {"items": False}
    read = {"separator": ITEM_END} if separator == ITEM_END else {}
    tagged = tagging.get("result")  # tags.TaggedCorpus of the corpus read last, or None
    track = tagged.track if tagged is not None else None
    train_tags = val_tags = None
    if items_unit:
        train_ids, val_ids, reshuffle, items_meta, val_tags = _item_split(
            corpus, r, items_reason, ITEM_END if items_unit == "files" else "\n", track)
    elif track is not None:
        from charlm.tags import split_by_tag

        train_ids, train_tags, val_ids, val_tags = split_by_tag(corpus.ids, track, len(tagged.tags), r.val_frac,
                                                                corpus.path)
    else:
        train_ids, val_ids = split_train_val(corpus.ids, r.val_frac, corpus.path)
    # Only once the corpus is known good (bad input leaves no directory behind); a failure here ends every
    # process of a torchrun job with the same message.
    agreed(dinfo, lambda: persist.prepare_run_dir(out, fresh=not r.resume), here=dinfo.is_main)
    mconf, batch, seq_len, sizing = _sizes(r, payload, corpus, train_ids, device, precision, dinfo, max_time,
                                           len(tagged.tags) if tagged is not None else 0)
    batch, seq_len = fit_layout(len(train_ids) - 1, batch, seq_len)
    eval_chars = _eval_chars(r, payload, sizing)
    if dinfo.enabled:
        batch = max(dinfo.world, batch - batch % dinfo.world)
    decay = r.weight_decay  # given, or a resumed run's own; else what autosize chose with the sizes
    if decay is None:
        decay = sizing.get("choice", {}).get("weight_decay", TrainConfig.weight_decay)
    tconf = TrainConfig(batch_size=batch, seq_len=seq_len, lr=r.lr, warmup_steps=r.warmup,
                        weight_decay=decay, optimizer=r.optimizer, clip=r.clip, epochs=r.epochs,
                        max_steps=r.max_steps, max_time=max_time, eval_every=r.eval_every, patience=r.patience,
                        val_frac=r.val_frac, seed=r.seed, precision=precision, eval_chars=eval_chars,
                        full_final_eval=r.full_final_eval)
    seed_everything(r.seed)
    model = CharRNN(mconf)
    if r.init_from is not None:
        # The checkpoint's weights, each old character's moved to its id in the grown vocabulary.
        grown = grow_state_dict(payload["model"], mconf.embedding, Vocabulary(payload["vocab"]), corpus.vocab)
        # and its tags: the text's new ones added, or tags given to an untagged model
        grown = grow_tags(grown, mconf.embedding or mconf.vocab_size, payload["model_config"].get("tags", 0),
                          mconf.tags)
        model.load_state_dict(grown)
    # How the text was read, so that --novelty and the sampling of items find the same cached ids.
    read = {"encoding": r.encoding, "keep_crlf": r.keep_crlf, "fixed_vocab": vocab is not None, **read,
            **({"unknown": "skip"} if r.unknown == "skip" else {}),
            **({"added_chars": vplan.added} if vplan and vplan.added else {}),
            **({"dropped_chars": vplan.dropped} if vplan and vplan.dropped else {}),
            **({"tag_by": r.tag_by, "tags": tagged.tags.to_dict(r.tag_by)} if tagged is not None else {}),
            # a tagged model fine-tuned on untagged text keeps its tags (without --tag-by: a resume reads the
            # text untagged, as this run does)
            **({"tags": payload["corpus"]["tags"]} if tagged is None and mconf.tags and payload is not None
               and payload.get("corpus", {}).get("tags") else {})}
    meta = {"model_config": mconf.to_dict(), "vocab": corpus.vocab.chars,
            "corpus": {**corpus.info(), **read, **items_meta}, "sizing": sizing}
    return TrainPlan(r, kept, out, payload, corpus, train_ids, val_ids, reshuffle, items_meta, sizing, tconf, model,
                     meta, vplan, tagged.tags if tagged is not None else None, train_tags, val_tags)


def _tagging(r: TrainRequest, payload: Optional[dict], source) -> dict:
    """What load_tagged is told for --tag-by (empty for untagged text): the rule, and the tag names a resumed
    or fine-tuned tagged model already has (its text must use only those)."""
    from charlm.tags import TagSet

    if not r.tag_by:
        return {}
    known = TagSet.from_payload(payload) if payload is not None else None
    if r.resume and known is None:
        raise CharlmError(f"the run in {source} was trained without tags; resume it without --tag-by")
    # --init-from: the model's tags keep their ids and the text's new ones are added (grow.grow_tags); an
    # untagged model gains tags. A resumed run's text must use its own tags only.
    return {"tag_by": r.tag_by, "known": known.names if known is not None else None, "grow": bool(r.init_from)}


def _items_mode(r: TrainRequest, payload, corpus, separator: str = DOC_SEPARATOR) -> tuple:
    """(None, "lines" or "files"; why). A resumed run keeps its mode; --items/--no-items force it (--items on
    several files makes each file an item, unless their lines pass the rule of a list); otherwise the rule in
    items.py decides from the text (corpora beyond 50M characters are never taken for lists). The corpus may be
    joined by `separator`; why is None when, joined by ITEM_END, it cannot tell (items.joined_view)."""
    from charlm.items import joined_view, looks_like_items

    if r.resume and payload is not None:
        saved = payload.get("corpus", {})
        if not saved.get("items"):
            return None, ""
        return ("files" if saved.get("item_end") == ITEM_END else "lines"), saved.get("items_reason",
                                                                                     "one item per line")
    if r.items is False:
        return None, "--no-items"
    text = (lambda: corpus.vocab.decode(corpus.ids[:2_000_000])) if corpus.chars <= 50_000_000 else None
    if r.items and len(corpus.files) > 1 and r.tag_by != "field":
        view = joined_view(corpus, separator)  # the text as if joined by a blank line, however it was encoded
        if view is None:
            return None, None
        head, newline, item_end = view
        is_list, why = looks_like_items(head) if head is not None and newline else (False, "")
        if is_list:
            return "lines", f"{why} (--items)"
        if item_end:
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


def _item_split(corpus, r: TrainRequest, reason: str, end: str, track: Optional[np.ndarray] = None) -> tuple:
    """(training text, validation text, reshuffle, items meta, validation tags). With a tag track, each item's
    tags go with it through the split and every epoch's order (reshuffle then returns (text, tags))."""
    from charlm.items import Items, context_of, epoch_order, split_items

    items = Items.from_ids(corpus.ids, corpus.vocab.chars.index(end))
    if len(items) < 2:
        raise CharlmError(f"{corpus.path} has {len(items)} item(s); a list needs at least 2 (one to validate)")
    train_items, val_items = split_items(items, r.val_frac, r.seed)
    train_tags = val_tags = None
    if track is not None:  # the same spans over the tag track (from_ids may have closed the last item)
        track = np.concatenate([track, track[-1:]]) if len(items.ids) > len(track) else track
        train_tags, val_tags = split_items(Items(track, items.start, items.length), r.val_frac, r.seed)

    def reshuffle(epoch: int):
        order = epoch_order(len(train_items), r.seed, epoch)
        text = train_items.text_ids(order)
        return text if train_tags is None else (text, train_tags.text_ids(order))

    meta = {"items": True, "items_reason": reason, "train_items": len(train_items), "val_items": len(val_items),
            # what sampling and scoring read before an item: the state an item starts from in training
            "item_context": context_of(train_items, epoch_order(len(train_items), r.seed, 0), corpus.vocab.decode,
                                       end),
            **({"item_end": end} if end != "\n" else {})}
    return (train_items.text_ids(), val_items.text_ids(), reshuffle, meta,
            val_tags.text_ids() if val_tags is not None else None)


def _sizes(r: TrainRequest, payload, corpus, train_ids, device, precision, dinfo, max_time, tags: int = 0) -> tuple:
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
             "weight_decay": r.weight_decay, "batch_size": r.batch_size, "seq_len": r.seq_len}
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
        saved = payload["model_config"]
        mconf = ModelConfig(**{**saved, "dropout": choice.dropout, "vocab_size": vocab_size,
                               **({"tags": tags} if tags else {})})
    else:
        mconf = ModelConfig(vocab_size=vocab_size, cell=r.cell, hidden=choice.hidden, layers=choice.layers,
                            dropout=choice.dropout, nonlinearity=r.nonlinearity, embedding=choice.embedding,
                            tags=tags)
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


def _training_corpus(inputs, vocab, r: TrainRequest, cache: Path, dinfo, console: Console,
                     separator: str = DOC_SEPARATOR, tagging: Optional[dict] = None):
    """The encoded corpus. Under torchrun the first process of each machine builds (or finds) the cached,
    memory-mapped ids while the others wait; then every process maps that file and reads only the rows it
    trains on. A bad file ends every process with the same one-line message. A tagged corpus (tagging from
    _tagging) is read by tags.load_tagged, on every process (its tag track is built from the files), and its
    TaggedCorpus left in tagging["result"]."""
    from charlm.corpus import describe_mapped, load_corpus, open_mapped
    from charlm.runtime import agreed

    def build():
        with CorpusProgress(console) as progress:
            if tagging:
                from charlm.tags import load_tagged

                tagging["result"] = load_tagged(inputs, tagging["tag_by"], vocab, r.encoding, r.keep_crlf, cache,
                                                r.unknown or "error", separator, progress, tagging["known"],
                                                tagging["grow"])
                return tagging["result"].corpus
            return load_corpus(inputs, vocab, r.encoding, r.keep_crlf, cache_dir=cache, separator=separator,
                               progress=progress, unknown=r.unknown or "error")

    if not dinfo.enabled:
        return build()
    if tagging:
        return agreed(dinfo, build)
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


def _vocab_plan(r: TrainRequest, inputs, vocab: Vocabulary, separator: str):
    """--init-from: the text's own characters (one read, nothing written), joined as they will be encoded (a
    folder of items by ITEM_END, which then joins the vocabulary), decided before the text is encoded once
    under the vocabulary the run keeps (grow.decide: grow, drop or refuse)."""
    from charlm.corpus import read_vocab
    from charlm.grow import decide

    where = str(inputs[0]) if len(inputs) == 1 else f"{inputs[0]} + {len(inputs) - 1} more"
    if r.tag_by == "field":  # the text after each line's tag: the tags and tabs are not characters of it
        from charlm.tags import field_vocab

        return decide(vocab, field_vocab(inputs, r.encoding, r.keep_crlf), where, r.grow_vocab, r.unknown)
    return decide(vocab, read_vocab(inputs, r.encoding, r.keep_crlf, separator), where, r.grow_vocab, r.unknown)


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
