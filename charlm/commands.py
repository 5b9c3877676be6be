"""The CLI's command bodies: turn parsed options into library calls and render what comes back.

Part of the command-line layer (cli.py parses, this module runs and renders): it prints, the library
modules it calls do not.
"""

from __future__ import annotations

import contextlib

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from charlm import checkpoint as ckpt
from charlm.corpus import DOC_SEPARATOR
from charlm.errors import CharlmError
from charlm.model import CharRNN, ModelConfig, layer_parameter_counts
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
    allow_copies: bool = False  # item models: also print items that are already in the training list
    min_length: int = 1  # item models: the shortest item to keep
    max_length: Optional[int] = None  # item models: the longest item to keep (longer ones are dropped, not cut)


def text_reading(payload: dict, encoding: Optional[str], keep_crlf: Optional[bool]) -> tuple:
    """(encoding, keep_crlf) to read a text for this model with: what the options say, else how its training
    text was read (the checkpoint's corpus info), so that a CRLF file scores as the model saw its text."""
    info = payload.get("corpus", {})
    return (encoding if encoding is not None else info.get("encoding") or "utf-8",
            keep_crlf if keep_crlf is not None else bool(info.get("keep_crlf", False)))


def read_input(path, name: str, encoding: str, keep_crlf: bool) -> str:
    """A whole (small) file's text, decoded as corpora are: a prime, a text to explain or rank."""
    from charlm.corpus import _Source, read_text

    path = Path(path)
    if not path.exists():
        raise CharlmError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise CharlmError(f"{path} is a directory; pass a text file")
    with _Source(name, path=path).open() as f:
        return "".join(read_text(f, name, encoding, keep_crlf))


def _load_model(checkpoint: Optional[Path], device_name: str):
    from charlm.runtime import pick_device

    payload = ckpt.load(checkpoint if checkpoint is not None else ckpt.latest_run())
    model, vocab = model_from_payload(payload)
    device = pick_device(device_name)
    return payload, model.to(device).eval(), vocab, device


def run_sample(r: SampleRequest, console: Console) -> None:
    from charlm.sample import SampleConfig, Sampler

    _check(r.length >= 1, f"--length must be at least 1, got {r.length}")
    _check(r.greedy or (r.temperature > 0 and math.isfinite(r.temperature)),
           f"--temperature must be above 0, got {r.temperature}; use --greedy for the most likely character")
    _check(0 < r.top_p <= 1, f"--top-p must be in (0, 1], got {r.top_p}")
    _check(r.top_k >= 0, f"--top-k must be 0 (off) or positive, got {r.top_k}")
    _check(r.num_samples is None or r.num_samples >= 1, f"--num-samples must be at least 1, got {r.num_samples}")
    _check(1 <= r.min_length <= (r.max_length or r.min_length), f"--min-length and --max-length need 1 <= min <= "
           f"max, got {r.min_length} and {r.max_length}")
    _check(r.unknown in ("error", "skip"), f"--unknown must be error or skip, got {r.unknown!r}")
    _check(not (r.prime is not None and r.prime_file is not None), "give --prime or --prime-file, not both")
    _check(not (r.interactive and (r.num_samples or 1) > 1), "--interactive works with one sample at a time")
    from charlm.runtime import sampling_device

    payload, model, vocab, _ = _load_model(r.checkpoint, "cpu")
    prime = r.prime
    if r.prime_file is not None:  # read as the model's training text was (encoding, line ends)
        prime = read_input(r.prime_file, str(r.prime_file), *text_reading(payload, None, None))
    _check(prime is None or prime != "", "the prime is empty; leave out --prime to start from a line break")
    items = bool(payload.get("corpus", {}).get("items")) and not r.interactive
    num_samples = r.num_samples or (10 if items else 1)  # a list model answers with a list
    device, note = sampling_device(r.device, num_samples if not items else 64, model.num_parameters())
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
    if items:
        return _sample_items(r, payload, model, vocab, prime, top_k, num_samples, device, console)
    cfg = SampleConfig(length=r.length, temperature=r.temperature if r.temperature > 0 else 1.0, top_k=top_k,
                       top_p=r.top_p, greedy=r.greedy, num_samples=num_samples, seed=r.seed, stop=r.stop)
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
        _report_novelty(payload, samples, prime, console, vocab)


def _training_corpus(payload):
    """The corpus a checkpoint was trained on, mapped from the cache beside its run (encoded if missing), or a
    CharlmError when its files are gone or changed."""
    from charlm.corpus import load_corpus

    info = payload.get("corpus", {})
    files = [Path(f) for f in (info.get("files") or [info.get("path", "")])]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise CharlmError(f"the training corpus, {missing[0]}, is not there any more")
    cache = Path(payload["path"]).resolve().parent.parent / ".charlm-cache"
    corpus = load_corpus(files, Vocabulary(payload["vocab"]) if info.get("fixed_vocab") else None,
                         info.get("encoding", "utf-8"), info.get("keep_crlf", False), cache_dir=cache,
                         separator=info.get("separator", DOC_SEPARATOR))
    if corpus.sha256 != info.get("sha256") or corpus.vocab.chars != payload["vocab"]:
        raise CharlmError(f"{info.get('path')} has changed since training")
    return corpus


def _sample_items(r: SampleRequest, payload, model, vocab, prime, top_k, count, device, console) -> None:
    """An item model's answer: new items, one per line (or JSON; items of a list of files are separated by
    --separator), each starting with the prime."""
    from charlm.items import Items, sample_items

    end = payload.get("corpus", {}).get("item_end", "\n")
    _check(not r.greedy, "--greedy would give the same item every time; lower --temperature instead")
    _check(end != "\n" or "\n" not in prime, "an item prime is the start of one item: it cannot hold a line break")
    try:
        corpus = _training_corpus(payload)
        items = Items.from_ids(corpus.ids, vocab.chars.index(end))
        longest = int(np.percentile(items.lengths_chars(), 99)) if len(items) else 0
        known = set(items.strings(vocab.decode))
    except CharlmError as exc:
        if not r.allow_copies:
            raise CharlmError(f"{exc}: it is needed to leave out items already in the list; add "
                              "--allow-copies to sample without that check")
        known, longest = set(), 0
    # Unless given, the longest item kept: half again the length of 99% of the list's items (64 at least).
    max_length = r.max_length or max(64, longest * 3 // 2, r.min_length)
    result = sample_items(model, vocab, count, known, prime, temperature=r.temperature, top_k=top_k, top_p=r.top_p,
                          min_length=max(r.min_length, len(prime) + 1 if prime else 1), max_length=max_length,
                          allow_copies=r.allow_copies, seed=r.seed, device=device, end=end)
    found = result["items"]
    out = sys.stdout
    if r.as_json:
        out.write(json.dumps({"items": [{"text": i.text, "logprob": round(i.logprob, 4), "new": i.new}
                                        for i in found], "copies_skipped": result["copies"],
                              "rejected": result["rejected"], "drawn": result["drawn"]}, ensure_ascii=False) + "\n")
    else:
        if end == "\n":
            out.write("".join(i.text + "\n" for i in found))
        elif found:  # whole files: separated as samples are
            out.write(r.separator.join(i.text.rstrip("\n") for i in found) + "\n")
    out.flush()
    skipped = f"skipped {result['copies']:,} already in the list" if not r.allow_copies else "copies allowed"
    console.print(f"[dim]items:[/dim] {len(found):,} of {count:,} from {result['drawn']:,} drawn; {skipped}, "
                  f"{result['rejected']:,} outside --min-length/--max-length", highlight=False)
    if not result["complete"]:
        raise CharlmError(f"found only {len(found):,} new item(s) of the {count:,} asked for after "
                          f"{result['drawn']:,} tries; ask for fewer, raise --temperature, or add --allow-copies")


def _report_novelty(payload, samples, prime, console, vocab) -> None:
    """The longest stretch of each sample found verbatim in the training text (charlm/novelty.py: one scan
    of the memory-mapped corpus, about a second per 100 MB)."""
    from charlm.novelty import longest_copies

    info = payload.get("corpus", {})
    try:
        corpus = _training_corpus(payload)
    except CharlmError as exc:
        raise CharlmError(f"--novelty cannot say what was copied: {exc}")
    generated = [text[len(prime):] for text in samples]
    found = longest_copies(corpus.ids, [vocab.encode(g) for g in generated])
    name = Path(info.get("path", "corpus")).name
    for i, (text, (start, length)) in enumerate(zip(generated, found)):
        copied = text[start : start + length]
        label = f"sample {i + 1}: " if len(samples) > 1 else ""
        shown = copied.replace("\n", "↵")
        console.print(escape(f"novelty: {label}longest run found verbatim in {name}: {len(copied)} of "
                             f"{len(text)} characters: {shown[:120]!r}"))


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
# A pass over more characters than this announces itself (a line, and a bar on a terminal): a few seconds
# of scoring for a small model on a 2-core CPU.
ANNOUNCE_CHARS = 1_000_000


@contextlib.contextmanager
def pass_progress(console: Console, what: str, chars: int):
    """progress(done, total) for a long pass: a permanent line saying what is scored (piped too), and a
    transient bar with its rate and ETA on a terminal. Short passes say nothing."""
    if chars < ANNOUNCE_CHARS:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console.print(f"{what}: {chars:,} characters", highlight=False)
    if not console.is_terminal:
        yield None
        return
    with Progress(TextColumn(f"[bold]{what}"), BarColumn(bar_width=24), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=console, transient=True) as bar:
        task = bar.add_task(what, total=1)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def run_eval(corpus: Path, checkpoint, encoding, unknown, streams, as_json, device_name, console: Console,
             keep_crlf: Optional[bool] = None, max_chars: Optional[int] = None) -> None:
    from charlm.corpus import load_corpus
    from charlm.evaluation import evaluate_text

    _check(unknown in ("error", "skip"), f"--unknown must be error or skip, got {unknown!r}")
    _check(streams >= 1, f"--streams must be at least 1, got {streams}")
    _check(max_chars is None or max_chars >= 1, f"--max-chars must be at least 1, got {max_chars}")
    payload, model, vocab, device = _load_model(checkpoint, device_name)
    info = payload.get("corpus", {})
    end = info.get("item_end", "\n")  # an item model: each line an item, or each file of a list of files
    encoding, keep_crlf = text_reading(payload, encoding, keep_crlf)
    text = load_corpus(corpus, vocab, encoding, keep_crlf, unknown=unknown,
                       separator=info.get("separator", DOC_SEPARATOR))
    if text.chars < 2:
        raise CharlmError(f"{corpus} has fewer than 2 known characters; nothing to score")
    scored = min(text.chars - 1, max_chars or text.chars)
    with pass_progress(console, "scoring" if scored == text.chars - 1 else "scoring an even sample", scored) as bar:
        # a sample is spread over at least 64 segments: its standard error needs rows to compare
        report = evaluate_text(model, text.ids, device, streams=max(streams, 64) if max_chars else streams,
                               max_chars=max_chars, progress=bar)
    report["checkpoint"] = payload["path"]
    if info.get("items") and end in vocab:
        # a model of a list: each item also scored as one, from the start of an item (as sampling writes)
        from charlm.items import Items, score_items

        lines = Items.from_ids(text.ids, vocab.chars.index(end)).strings(vocab.decode)
        scores = score_items(model, vocab, lines, device, end=end)
        chars = sum(len(x) + 1 for x in lines)
        report["items"] = {"count": len(lines), "nats_per_item": float(-scores.mean()) if len(lines) else None,
                           "nats_per_char": float(-scores.sum() / max(chars, 1))}
    if as_json:
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
