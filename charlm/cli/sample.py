"""`charlm sample`: text from a model, streamed as it is written, or new items from a list model; --novelty
says how much of each sample was copied from the training text, --interactive takes turns with the user.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from rich.console import Console
from rich.markup import escape

from charlm.cli.common import check
from charlm.cli.display import pass_progress
from charlm.corpus import read_file
from charlm.errors import CharlmError
from charlm.runs import item_list, load_model, longest_item_kept, text_reading, training_corpus
from charlm.tags import resolve
from charlm.vocab import describe_chars, unknown_message


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
    tag: Optional[List[str]] = None  # a tagged model: sample in these voices (--num-samples each, one batch)


def run_sample(r: SampleRequest, console: Console) -> None:
    from charlm.sample import SampleConfig, stream_text

    check(r.length >= 1, f"--length must be at least 1, got {r.length}")
    check(r.greedy or (r.temperature > 0 and math.isfinite(r.temperature)),
           f"--temperature must be above 0, got {r.temperature}; use --greedy for the most likely character")
    check(0 < r.top_p <= 1, f"--top-p must be in (0, 1], got {r.top_p}")
    check(r.top_k >= 0, f"--top-k must be 0 (off) or positive, got {r.top_k}")
    check(r.num_samples is None or r.num_samples >= 1, f"--num-samples must be at least 1, got {r.num_samples}")
    check(1 <= r.min_length <= (r.max_length or r.min_length), f"--min-length and --max-length need 1 <= min <= "
           f"max, got {r.min_length} and {r.max_length}")
    check(r.unknown in ("error", "skip"), f"--unknown must be error or skip, got {r.unknown!r}")
    check(not (r.prime is not None and r.prime_file is not None), "give --prime or --prime-file, not both")
    check(not (r.interactive and (r.num_samples or 1) > 1), "--interactive works with one sample at a time")
    from charlm.runtime import sampling_device

    payload, model, vocab, _ = load_model(r.checkpoint, "cpu")
    tag_ids = resolve(payload, r.tag)  # None: untagged (a tagged model samples the whole text's voice)
    check(not (tag_ids and len(tag_ids) > 1 and (r.interactive or r.novelty)),
          "--interactive and --novelty take one --tag at a time")
    prime = r.prime
    if r.prime_file is not None:  # read as the model's training text was (encoding, line ends)
        prime = read_file(r.prime_file, *text_reading(payload, None, None))
    check(prime is None or prime != "", "the prime is empty; leave out --prime to start from a line break")
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
            raise CharlmError(unknown_message("the prime", missing))
    if items:
        return _sample_items(r, payload, model, vocab, prime, top_k, num_samples, device, console, tag_ids)
    labels = [None] * num_samples
    if tag_ids:  # every tag's samples in one batch, in the order the tags were given
        import torch

        labels = [name for name in r.tag for _ in range(num_samples)]
        rows = torch.as_tensor([t for t in tag_ids for _ in range(num_samples)], device=device)
        model, num_samples = model.conditioned(rows), len(labels)
    cfg = SampleConfig(length=r.length, temperature=r.temperature if r.temperature > 0 else 1.0, top_k=top_k,
                       top_p=r.top_p, greedy=r.greedy, num_samples=num_samples, seed=r.seed, stop=r.stop)
    out = sys.stdout
    try:
        if r.interactive:
            _interactive(model, vocab, prime, cfg, device, console)
            return
        texts = [[prime] for _ in range(cfg.num_samples)]
        stream = cfg.num_samples == 1 and not r.as_json
        if stream:
            out.write(prime)
            out.flush()
        # The library samples (charlm.sample: the same text as sample_text, seed for seed); this writes it.
        for i, step in enumerate(stream_text(model, vocab, prime, cfg, device)):
            for b, ch in enumerate(step):
                texts[b].append(ch)
            if stream:
                out.write(step[0])
                if i % 8 == 7:
                    out.flush()
        samples = ["".join(t) for t in texts]
        if r.as_json:
            out.write(json.dumps({"samples": samples, **({"tags": labels} if tag_ids else {})},
                                 ensure_ascii=False) + "\n")
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


def _sample_items(r: SampleRequest, payload, model, vocab, prime, top_k, count, device, console,
                  tag_ids: Optional[List[int]] = None) -> None:
    """An item model's answer: new items, one per line (or JSON; items of a list of files are separated by
    --separator), each starting with the prime. With several tags, `count` items of each, a line each as
    TAG<TAB>ITEM (the form --tag-by field reads)."""
    from charlm.items import item_context, sample_items

    end = payload.get("corpus", {}).get("item_end", "\n")
    check(not r.greedy, "--greedy would give the same item every time; lower --temperature instead")
    check(end != "\n" or "\n" not in prime, "an item prime is the start of one item: it cannot hold a line break")
    try:
        listed = item_list(payload, vocab)
        known = listed.known
    except CharlmError as exc:
        if not r.allow_copies:
            raise CharlmError(f"{exc}: it is needed to leave out items already in the list; add "
                              "--allow-copies to sample without that check")
        listed, known = None, set()
    max_length = r.max_length or longest_item_kept(listed, r.min_length)
    results = []
    for k, tag in enumerate(tag_ids or [None]):  # each tag's items drawn in its voice, the seed moved on per tag
        seed = r.seed + k if r.seed is not None and k else r.seed
        results.append(sample_items(model.conditioned(tag) if tag is not None else model, vocab, count, known,
                                    prime, temperature=r.temperature, top_k=top_k, top_p=r.top_p,
                                    min_length=max(r.min_length, len(prime) + 1 if prime else 1),
                                    max_length=max_length, allow_copies=r.allow_copies, seed=seed, device=device,
                                    end=end, context=item_context(payload)))
    names = r.tag or [None]
    labelled = [(names[k], i) for k, res in enumerate(results) for i in res["items"]]
    found = [i for _, i in labelled]
    result = {key: sum(res[key] for res in results) for key in ("copies", "rejected", "drawn")}
    result["complete"] = all(res["complete"] for res in results)
    count *= len(results)
    out = sys.stdout
    if r.as_json:
        out.write(json.dumps({"items": [{"text": i.text, "logprob": round(i.logprob, 4), "new": i.new,
                                         **({"tag": t} if t is not None else {})} for t, i in labelled],
                              "copies_skipped": result["copies"],
                              "rejected": result["rejected"], "drawn": result["drawn"]}, ensure_ascii=False) + "\n")
    else:
        if end == "\n":
            several = len(results) > 1
            out.write("".join((f"{t}\t" if several else "") + i.text + "\n" for t, i in labelled))
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
        corpus = training_corpus(payload)
    except CharlmError as exc:
        raise CharlmError(f"--novelty cannot say what was copied: {exc}")
    generated = [text[len(prime):] for text in samples]
    name = Path(info.get("path", "corpus")).name
    with pass_progress(console, f"novelty: searching {name}", len(corpus.ids)) as bar:
        found = longest_copies(corpus.ids, [vocab.encode(g) for g in generated], progress=bar)
    for i, (text, (start, length)) in enumerate(zip(generated, found)):
        copied = text[start : start + length]
        label = f"sample {i + 1}: " if len(samples) > 1 else ""
        shown = copied.replace("\n", "↵")
        console.print(escape(f"novelty: {label}longest run found verbatim in {name}: {len(copied)} of "
                             f"{len(text)} characters: {shown[:120]!r}"))


def _interactive(model, vocab, prime, cfg, device, console: Console) -> None:
    from charlm.sample import Sampler

    sampler = Sampler(model, vocab, 1, device, cfg.seed)  # model: conditioned on its --tag, if one was given
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
