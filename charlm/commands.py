"""The CLI's command bodies: turn parsed options into library calls and render what comes back.

Part of the command-line layer (cli.py parses, this module runs and renders): it prints, the library
modules it calls do not.
"""

from __future__ import annotations

import json
import math
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm import checkpoint as ckpt
from charlm.errors import CharlmError
from charlm.model import CELLS, CharRNN, ModelConfig, layer_parameter_counts
from charlm.vocab import Vocabulary, describe_chars


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CharlmError(message, exit_code=2)


def model_from_payload(payload: dict):
    """(model with weights loaded, vocabulary) from a loaded checkpoint."""
    try:
        config = ModelConfig(**payload["model_config"])
        vocab = Vocabulary(payload["vocab"])
        model = CharRNN(config)
        model.load_state_dict(payload["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as exc:
        raise CharlmError(f"{payload.get('path', 'checkpoint')} does not describe a model this charlm can build "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return model, vocab


# ============================================================================================== train
@dataclass
class TrainRequest:
    corpus: Optional[Path]
    named: Optional[str]
    encoding: str
    keep_crlf: bool
    val_frac: float
    cell: str
    nonlinearity: str
    hidden: int
    layers: int
    dropout: float
    embedding: int
    batch_size: int
    seq_len: int
    lr: float
    optimizer: str
    weight_decay: float
    warmup: int
    clip: float
    epochs: Optional[float]
    max_steps: Optional[int]
    max_time: Optional[str]
    eval_every: int
    patience: int
    seed: int
    device: str
    precision: str
    compile_model: bool
    out: Optional[Path]
    resume: bool
    init_from: Optional[Path]
    force: bool
    preview: bool


def _validate_train(r: TrainRequest) -> None:
    from charlm.train import OPTIMIZERS

    _check((r.corpus is None) != (r.named is None), "give a text file or --corpus NAME (one of them); "
           "try: charlm train --corpus python-stdlib")
    for flag, value, least in (("--hidden", r.hidden, 1), ("--layers", r.layers, 1), ("--batch-size", r.batch_size, 1),
                               ("--seq-len", r.seq_len, 1), ("--eval-every", r.eval_every, 1),
                               ("--embedding", r.embedding, 0), ("--warmup", r.warmup, 0),
                               ("--patience", r.patience, 0), ("--weight-decay", r.weight_decay, 0)):
        _check(value >= least, f"{flag} must be at least {least}, got {value}")
    _check(0 < r.val_frac < 1, f"--val-frac must be between 0 and 1 (exclusive), got {r.val_frac}")
    _check(r.cell in CELLS, f"--cell must be one of {', '.join(CELLS)}, got {r.cell!r}")
    _check(r.nonlinearity in ("tanh", "relu"), f"--nonlinearity must be tanh or relu, got {r.nonlinearity!r}")
    _check(r.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {r.optimizer!r}")
    _check(0 <= r.dropout < 1, f"--dropout must be in [0, 1), got {r.dropout}")
    _check(r.lr > 0 and math.isfinite(r.lr), f"--lr must be a positive number, got {r.lr}")
    _check(r.clip > 0, f"--clip must be positive, got {r.clip}")
    _check(r.epochs is None or r.epochs > 0, f"--epochs must be positive, got {r.epochs}")
    _check(r.max_steps is None or r.max_steps > 0, f"--max-steps must be positive, got {r.max_steps}")
    _check(not (r.resume and r.init_from), "--resume and --init-from do not mix: resume continues a run, "
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


def _preview_fn(vocab: Vocabulary, device):
    from charlm.sample import SampleConfig, sample_text

    def preview(model) -> list:
        lines = []
        for temperature in (0.5, 1.0):
            cfg = SampleConfig(length=90, temperature=temperature, seed=1234)
            text = sample_text(model, vocab, "", cfg, device)[0]
            lines.append(f"T={temperature}: " + text.replace("\n", "↵").replace("\r", "␍"))
        return lines

    return preview


def run_train(r: TrainRequest, console: Console) -> None:
    from charlm import datasets
    from charlm.corpus import fit_layout, load_corpus, split_train_val
    from charlm.display import TrainDisplay, human_count, run_summary, vocab_preview
    from charlm.runtime import (parse_duration, resolve_precision, seed_everything, setup_distributed,
                                teardown_distributed)
    from charlm.train import TrainConfig, Trainer

    _validate_train(r)
    max_time = parse_duration(r.max_time) if r.max_time else None
    if max_time is None and r.epochs is None and r.max_steps is None:
        max_time = 600.0  # the default budget: ten minutes, good text on a 2-core CPU
    dinfo, device = setup_distributed(r.device)
    if not dinfo.is_main:
        console = Console(stderr=True, quiet=True)
    try:
        precision = resolve_precision(r.precision, device)
        if r.named:
            path = _named_corpus(r.named, console, dinfo)
        else:
            path = r.corpus
        stem = r.named or Path(path).stem or "corpus"
        out = _out_dir(r, stem)
        payload = None
        if r.resume:
            payload = ckpt.load(out, prefer=ckpt.LAST)
        elif r.init_from is not None:
            payload = ckpt.load(r.init_from)
        vocab = Vocabulary(payload["vocab"]) if payload else None
        # The encoded corpus is cached beside the run directories, keyed by the file's SHA-256: every later
        # run on the same file, in any run directory there, skips decoding.
        cache = out.parent / ".charlm-cache" if dinfo.is_main else None
        corpus = load_corpus(path, vocab, r.encoding, r.keep_crlf, cache_dir=cache)
        if r.resume:
            saved = payload.get("corpus", {})
            if saved.get("sha256") not in (None, corpus.sha256) and not r.force:
                raise CharlmError(f"{path} is not the corpus this run was trained on (SHA-256 differs from "
                                  f"{saved.get('path')}); resume with the same file, or add --force")
        train_ids, val_ids = split_train_val(corpus.ids, r.val_frac, path)
        if dinfo.is_main:  # only once the corpus is known good: bad input leaves no directory behind
            _prepare_out(out, fresh=not r.resume)
        batch, seq_len = fit_layout(len(train_ids) - 1, r.batch_size, r.seq_len)
        if dinfo.enabled:
            batch = max(dinfo.world, batch - batch % dinfo.world)
        if payload is not None:
            mconf = ModelConfig(**payload["model_config"])
        else:
            mconf = ModelConfig(vocab_size=corpus.vocab.size, cell=r.cell, hidden=r.hidden, layers=r.layers,
                                dropout=r.dropout, nonlinearity=r.nonlinearity, embedding=r.embedding)
        tconf = TrainConfig(batch_size=batch, seq_len=seq_len, lr=r.lr, warmup_steps=r.warmup,
                            weight_decay=r.weight_decay, optimizer=r.optimizer, clip=r.clip, epochs=r.epochs,
                            max_steps=r.max_steps, max_time=max_time, eval_every=r.eval_every, patience=r.patience,
                            val_frac=r.val_frac, seed=r.seed, precision=precision)
        seed_everything(r.seed)
        model = CharRNN(mconf)
        if r.init_from is not None:
            model.load_state_dict(payload["model"])
        meta = {"model_config": mconf.to_dict(), "vocab": corpus.vocab.chars, "corpus": corpus.info()}
        display = TrainDisplay(console, _preview_fn(corpus.vocab, device) if r.preview else None)
        trainer = Trainer(model, train_ids, val_ids, tconf, out, device, meta, callback=display, dist_info=dinfo,
                          resume=payload if r.resume else None, compile_model=r.compile_model)

        info = _start_summary(path, corpus, train_ids, val_ids, model, tconf, device, dinfo, out, r, trainer.n_chunks)
        run_summary(console, info)
        received = []

        def on_signal(signum, frame):
            received.append(signum)
            trainer.request_stop("interrupt")

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        with display:
            result = trainer.run()
        for s, handler in previous.items():  # after an interrupt, more Ctrl-Cs are ignored until the exit
            signal.signal(s, signal.SIG_IGN if received else handler)
        _end_summary(console, result, out, r, received)
    finally:
        teardown_distributed()


def _named_corpus(name: str, console: Console, dinfo) -> Path:
    from charlm import datasets

    if dinfo.is_main:
        from rich.progress import DownloadColumn, Progress, BarColumn, TransferSpeedColumn

        with Progress(f"[bold]downloading {name}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(name, total=None)
            path = datasets.corpus_path(name, progress=lambda done, total: bar.update(task, completed=done,
                                                                                      total=total or None))
    if dinfo.enabled:
        import torch.distributed as dist

        dist.barrier()
        path = datasets.corpus_path(name)
    return path


def _start_summary(path, corpus, train_ids, val_ids, model, tconf, device, dinfo, out, r, n_chunks) -> dict:
    from charlm.display import human_count, human_time, vocab_preview

    mc = model.config
    params = model.num_parameters()
    rows = [
        ("corpus", f"{path}: {corpus.chars:,} characters ({len(train_ids):,} train, {len(val_ids):,} validation)"
                   + (f", {corpus.crlf_converted:,} CRLF -> LF" if corpus.crlf_converted else "")),
        ("vocabulary", f"{corpus.vocab.size} characters: {vocab_preview(corpus.vocab.chars)}"),
        ("model", f"{mc.layers} x {mc.hidden} {mc.cell}{'-' + mc.nonlinearity if mc.cell == 'rnn' else ''}, "
                  f"{'one-hot' if not mc.embedding else f'{mc.embedding}-d embedding'} input, "
                  f"{params:,} parameters"),
        ("layout", f"{tconf.batch_size} streams x {tconf.seq_len}-character chunks "
                   f"({n_chunks:,} steps per epoch)"),
        ("device", f"{device} ({tconf.precision})" + (f", {dinfo.world} processes" if dinfo.enabled else "")),
        ("limits", ", ".join(f"{k.replace('_', ' ')} {human_time(v) if k == 'max_time' else v}" for k, v in
                             (("max_time", tconf.max_time), ("max_steps", tconf.max_steps), ("epochs", tconf.epochs))
                             if v) + f", patience {tconf.patience}"),
        ("run", f"{out}" + (" (resumed)" if r.resume else "") + (f" (from {r.init_from})" if r.init_from else "")),
    ]
    warnings = []
    if (tconf.batch_size, tconf.seq_len) != (r.batch_size, r.seq_len):
        warnings.append(f"the corpus is small: using {tconf.batch_size} streams of {tconf.seq_len}-character chunks "
                        f"instead of {r.batch_size} x {r.seq_len}")
    if corpus.chars < 10_000:
        warnings.append(f"{corpus.chars:,} characters is very little text; expect memorisation rather than style "
                        "(100k+ characters learn far better)")
    ratio = params / max(len(train_ids), 1)
    if ratio > 10 or ratio < 0.1:
        advice = "smaller --hidden" if ratio > 10 else "larger --hidden or more --layers"
        warnings.append(f"{human_count(params)} parameters for {human_count(len(train_ids))} training characters "
                        f"(ratio {ratio:.2g}); the rule of thumb is the same order of magnitude: try {advice}")
    if corpus.vocab.size > 1000 and not mc.embedding:
        warnings.append(f"{corpus.vocab.size} distinct characters: --embedding 256 trains faster than one-hot input")
    return {"rows": rows, "warnings": warnings}


def _end_summary(console: Console, result, out: Path, r: TrainRequest, received: list) -> None:
    from charlm.display import human_time, sparkline

    resume_cmd = "charlm " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--resume") + " --resume"
    if result.stopped_by == "nonfinite":
        kept = f"; best.pt is from step {result.best_step}" if result.best_step else "; no checkpoint was written"
        raise CharlmError(f"the loss became NaN or infinite at step {result.step + 1}: training stopped and "
                          f"nothing was overwritten{kept}; lower --lr or --clip and try again")
    vals = [m["val_loss"] for m in result.metrics]
    reasons = {"max_steps": "reached --max-steps", "epochs": "reached --epochs", "max_time": "reached --max-time",
               "patience": f"validation loss stopped improving (--patience {r.patience})", "interrupt": "interrupted"}
    console.print(f"[bold]stopped[/bold]: {reasons.get(result.stopped_by, result.stopped_by)} at step {result.step} "
                  f"(epoch {result.epoch}) after {human_time(result.elapsed_s)}")
    if math.isfinite(result.best_val_loss):
        bv = result.best_val_loss
        console.print(f"[bold]best[/bold]: val loss {bv:.4f} nats/char, {bv / math.log(2):.3f} bpc, perplexity "
                      f"{math.exp(bv):.2f} (step {result.best_step})   {sparkline(vals)}")
    console.print(f"[bold]run[/bold]: {out}/ (best.pt, last.pt, metrics.jsonl)")
    console.print(f"[bold]next[/bold]: charlm sample -c {shlex.quote(str(out))} --prime \"...\"   |   "
                  f"charlm plot {shlex.quote(str(out))}")
    if result.stopped_by == "interrupt":
        console.print(f"[bold]resume[/bold]: {escape(resume_cmd)}")
        raise SystemExit(128 + (received[0] if received else signal.SIGINT))
    console.print(f"[bold]train longer[/bold]: {escape(resume_cmd)} with a larger --max-time, --max-steps or --epochs")


# ============================================================================================== sample
@dataclass
class SampleRequest:
    checkpoint: Optional[Path]
    prime: Optional[str]
    prime_file: Optional[Path]
    length: int
    temperature: float
    top_k: int
    top_p: float
    greedy: bool
    num_samples: int
    stop: Optional[str]
    unknown: str
    seed: Optional[int]
    novelty: bool
    interactive: bool
    separator: str
    as_json: bool
    device: str


def _load_model(checkpoint: Optional[Path], device_name: str):
    from charlm.runtime import pick_device

    payload = ckpt.load(checkpoint if checkpoint is not None else ckpt.latest_run())
    model, vocab = model_from_payload(payload)
    device = pick_device(device_name)
    return payload, model.to(device).eval(), vocab, device


def run_sample(r: SampleRequest, console: Console) -> None:
    from charlm.sample import SampleConfig, Sampler, longest_verbatim

    _check(r.length >= 1, f"--length must be at least 1, got {r.length}")
    _check(r.greedy or (r.temperature > 0 and math.isfinite(r.temperature)),
           f"--temperature must be above 0, got {r.temperature}; use --greedy for the most likely character")
    _check(0 < r.top_p <= 1, f"--top-p must be in (0, 1], got {r.top_p}")
    _check(r.top_k >= 0, f"--top-k must be 0 (off) or positive, got {r.top_k}")
    _check(r.num_samples >= 1, f"--num-samples must be at least 1, got {r.num_samples}")
    _check(r.unknown in ("error", "skip"), f"--unknown must be error or skip, got {r.unknown!r}")
    _check(not (r.prime is not None and r.prime_file is not None), "give --prime or --prime-file, not both")
    _check(not (r.interactive and r.num_samples > 1), "--interactive works with one sample at a time")
    prime = r.prime
    if r.prime_file is not None:
        from charlm.corpus import read_bytes

        try:
            prime = read_bytes(r.prime_file).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CharlmError(f"{r.prime_file}: not valid UTF-8 at byte offset {exc.start}")
    _check(prime is None or prime != "", "the prime is empty; leave out --prime to start from a line break")

    from charlm.runtime import sampling_device

    payload, model, vocab, _ = _load_model(r.checkpoint, "cpu")
    device, note = sampling_device(r.device, r.num_samples, model.num_parameters())
    if note:
        console.print(f"[dim]note:[/dim] {note}")
    model = model.to(device)
    top_k = r.top_k
    if top_k > vocab.size:
        console.print(f"[dim]note:[/dim] --top-k {top_k} is more than the {vocab.size} characters of the vocabulary; "
                      f"using {vocab.size} (no truncation)")
        top_k = vocab.size
    prime = prime or ""
    if prime:
        missing = vocab.unknown(prime)
        if missing and r.unknown == "skip":
            console.print(f"[dim]note:[/dim] dropped {len(missing)} character(s) not in the vocabulary: "
                          f"{escape(describe_chars(missing))}")
            prime = "".join(c for c in prime if c in vocab)
        elif missing:
            raise CharlmError(f"the prime has {len(missing)} character(s) not in the model's vocabulary: "
                              f"{describe_chars(missing)}; remove them or add --unknown skip")
    cfg = SampleConfig(length=r.length, temperature=r.temperature if r.temperature > 0 else 1.0, top_k=top_k,
                       top_p=r.top_p, greedy=r.greedy, num_samples=r.num_samples, seed=r.seed, stop=r.stop)
    out = sys.stdout
    try:
        if r.interactive:
            _interactive(model, vocab, prime, cfg, device, console)
            return
        sampler = Sampler(model, vocab, cfg.num_samples, device, cfg.seed)
        if prime:
            sampler.feed(vocab.encode(prime))
        texts = [[prime] for _ in range(cfg.num_samples)]
        stream = cfg.num_samples == 1 and not r.as_json
        if stream:
            out.write(prime)
            out.flush()
        for i, step in enumerate(sampler.generate(cfg)):
            for b, ch in enumerate(step):
                texts[b].append(ch)
            if stream:
                out.write(step[0])
                if i % 8 == 7:
                    out.flush()
        samples = ["".join(t) for t in texts]
        if r.as_json:
            out.write(json.dumps({"samples": samples}, ensure_ascii=False) + "\n")
        elif stream:
            out.write("\n" if not samples[0].endswith("\n") else "")
        else:
            out.write(r.separator.join(samples) + ("\n" if not samples[-1].endswith("\n") else ""))
        out.flush()
    except BrokenPipeError:  # `charlm sample | head`: the reader left; nothing more to say
        sys.stderr.close()
        raise SystemExit(0)
    except KeyboardInterrupt:
        out.write("\n")
        raise SystemExit(130)
    if r.novelty:
        _report_novelty(payload, samples, prime, console, longest_verbatim)


def _report_novelty(payload, samples, prime, console, longest_verbatim) -> None:
    import hashlib

    info = payload.get("corpus", {})
    path = Path(info.get("path", ""))
    if not path.is_file():
        raise CharlmError(f"--novelty needs the training corpus, {path}, which is not there any more")
    raw = path.read_bytes()
    if hashlib.sha256(raw).hexdigest() != info.get("sha256"):
        raise CharlmError(f"--novelty: {path} has changed since training, so it cannot say what was copied")
    corpus = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    for i, text in enumerate(samples):
        generated = text[len(prime):]
        copied = longest_verbatim(generated, corpus)
        label = f"sample {i + 1}: " if len(samples) > 1 else ""
        shown = copied.replace("\n", "↵")
        console.print(escape(f"novelty: {label}longest run found verbatim in {path.name}: {len(copied)} of "
                             f"{len(generated)} characters: {shown[:120]!r}"))


def _interactive(model, vocab, prime, cfg, device, console: Console) -> None:
    from charlm.sample import Sampler

    sampler = Sampler(model, vocab, 1, device, cfg.seed)
    console.print("interactive: type text for the model to continue (its state carries over between turns); "
                  "an empty line lets it go on; Ctrl-D quits")
    if prime:
        sampler.feed(vocab.encode(prime))
        sys.stdout.write(prime)
    while True:
        for step in sampler.generate(cfg):
            sys.stdout.write(step[0])
        sys.stdout.write("\n")
        sys.stdout.flush()
        try:
            line = console.input("[bold]> [/bold]")
        except EOFError:
            return
        missing = vocab.unknown(line)
        if missing:
            console.print(f"[dim]note:[/dim] dropped characters not in the vocabulary: {escape(describe_chars(missing))}")
            line = "".join(c for c in line if c in vocab)
        if line:
            sampler.feed(vocab.encode(line))
            sys.stdout.write(line)


# ============================================================================================== eval / info / plot
def run_eval(corpus: Path, checkpoint, encoding, unknown, streams, as_json, device_name, console: Console) -> None:
    from charlm.corpus import load_corpus
    from charlm.train import evaluate_text

    _check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    _check(streams >= 1, f"--streams must be at least 1, got {streams}")
    payload, model, vocab, device = _load_model(checkpoint, device_name)
    text = load_corpus(corpus, vocab, encoding, unknown=unknown)
    if text.chars < 2:
        raise CharlmError(f"{corpus} has fewer than 2 known characters; nothing to score")
    report = evaluate_text(model, text.ids, device, streams=streams)
    report["checkpoint"] = payload["path"]
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
        return
    table = Table(show_header=False, box=None)
    for key, value in (("loss", f"{report['loss']:.4f} nats/char"), ("bpc", f"{report['bpc']:.4f} bits/char"),
                       ("perplexity", f"{report['perplexity']:.3f}"), ("chars", f"{report['chars']:,}"),
                       ("checkpoint", report["checkpoint"])):
        table.add_row(key, value)
    Console().print(table)


def run_info(path: Optional[Path], as_json: bool, console: Console) -> None:
    payload = ckpt.load(path if path is not None else ckpt.latest_run())
    model, vocab = model_from_payload(payload)
    rows = layer_parameter_counts(model.config)
    total = sum(r[2] for r in rows)
    assert total == model.num_parameters(), "layer formula disagrees with the model"
    metrics = payload.get("metrics", [])
    summary = {
        "checkpoint": payload["path"], "format": payload["format"], "charlm_version": payload.get("charlm_version"),
        "model_config": payload["model_config"],
        "layers": [{"name": n, "shape": s, "parameters": p} for n, s, p in rows], "parameters": total,
        "vocab_size": vocab.size, "vocab": vocab.chars, "train_config": payload.get("train_config", {}),
        "step": payload.get("step"), "epoch": payload.get("epoch"), "best_val_loss": payload.get("best_val_loss"),
        "best_step": payload.get("best_step"), "evaluations": len(metrics), "corpus": payload.get("corpus", {}),
    }
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
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)


def run_plot(run_dir: Optional[Path], output: Optional[Path], console: Console) -> None:
    from charlm.display import terminal_chart

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
