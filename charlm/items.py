"""Lists of things: a text with one item per line (names, words, titles) trained as items, sampled as items.

Recognising a list. Read the first MAX_LINES lines; the text is a list when all of these hold:

    lines        at least MIN_ITEMS non-blank lines
    short        the median line is at most 40 characters and 95% are at most 80
    few words    the median line has at most 4 words (a line of 8 words is a sentence, not a name)
    no blanks    at most 1% of the lines are blank (stanzas and code paragraphs have blank lines)
    distinct     at least 90% of the lines differ from each other (refrains and `return` lines repeat)
    no columns   the lines do not share a delimiter count (CSV and TSV rows are records, not items)
    no indents   at most 5% of the lines start with a space or a tab (source code does)

A folder of files (or several files) with --items is trained as a list of files, a file being one item,
unless its lines pass the rule above (a folder of name lists is still a list of names). The files are then
joined by ITEM_END, a control character that ends each item the way a line break ends a line.

Training on items. The items are split at random (seeded) into training and validation items, and every
epoch lays the training items out in a new order, a permutation drawn from (seed, epoch): the model learns
what an item looks like instead of the order of the list, and a resumed run draws the same orders. The
reordered text goes through the same stream layout and carried state as any other text (streams.py).

Sampling and scoring items. Each item starts from the state after a line break and ends at the next one; a
prime is the beginning of the item. In training the state at an item's start has just read other items (the
list runs through the carried state like any text), never the empty state, so the state an item starts from
is the one after reading a few training items, CONTEXT_ITEMS of the first epoch's order, kept in the
checkpoint (corpus.item_context): with it the held-out names of a 1-minute model scored 2.596 nats/char
against 2.671 from an empty state (BENCHMARKS.md 11). A checkpoint without it starts empty, as before. Items already in the list are set aside unless copies are allowed, and the sampler
draws batches until it has enough new ones or has tried MAX_ROUNDS times.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Iterator, List, Optional

import numpy as np
import torch

from charlm import state as st
from charlm.errors import CharlmError

MIN_ITEMS = 50
MAX_LINES = 200_000
MAX_ROUNDS = 25  # batches of samples drawn before giving up on finding enough new items
CONTEXT_ITEMS = 4  # training items read before an item is sampled or scored (1 gave 2.609, 3 gave 2.595)
# Ends each item of a list of files: U+001E, ASCII's record separator, made for this and absent from text.
ITEM_END = "\x1e"


def looks_like_items(text: str) -> tuple:
    """(is a list, reason): the rule above, on the first MAX_LINES lines of text."""
    lines = text.split("\n", MAX_LINES)[:MAX_LINES]
    if lines and lines[-1] == "":
        lines = lines[:-1]
    filled = [x for x in lines if x.strip()]
    if len(filled) < MIN_ITEMS:
        return False, f"{len(filled)} lines (a list has at least {MIN_ITEMS})"
    lengths = np.array([len(x) for x in filled])
    if np.median(lengths) > 40 or np.percentile(lengths, 95) > 80:
        return False, f"lines of {np.median(lengths):.0f} characters (median): prose, not items"
    words = np.median([len(x.split()) for x in filled])
    if words > 4:
        return False, f"lines of {words:.0f} words (median): sentences, not items"
    blank = (len(lines) - len(filled)) / len(lines)
    if blank > 0.01:
        return False, f"{blank:.0%} blank lines: paragraphs or stanzas"
    distinct = len(set(filled)) / len(filled)
    if distinct < 0.9:
        return False, f"only {distinct:.0%} of the lines are distinct"
    for sep in (",", "\t", ";", "|"):
        counts = np.array([x.count(sep) for x in filled])
        if (counts > 0).mean() > 0.9 and (counts == np.bincount(counts).argmax()).mean() > 0.9:
            return False, f"rows with {np.bincount(counts).argmax()} {sep!r} each: a table"
    indented = np.mean([x[:1] in (" ", "\t") for x in filled])
    if indented > 0.05:
        return False, f"{indented:.0%} of the lines are indented: code or verse"
    return True, f"{len(filled):,} lines, one item per line"


# The list rule reads this much of a text, and never takes a text longer than LIST_MAX_CHARS for a list.
LIST_READ_CHARS = 2_000_000
LIST_MAX_CHARS = 50_000_000


def files_are_items_likely(paths, encoding: str = "utf-8", keep_crlf: bool = False) -> bool:
    """Whether `--items` on these inputs will make each file an item: there are several files, and their lines
    do not pass the list rule (which would make each line an item). Judged from the first LIST_READ_CHARS
    characters without encoding the files, so that they are encoded once, joined the way they will be
    trained. A guess: the rule itself is applied to the encoded corpus (joined_view), and a wrong guess only
    costs a second read."""
    from charlm.corpus import DOC_SEPARATOR, expand_inputs, peek_text

    try:
        files = expand_inputs(list(paths))
        if len(files) < 2:
            return False
        if sum(f.stat().st_size for f in files) > LIST_MAX_CHARS:
            return True  # most likely too long for a list
        return not looks_like_items(peek_text(files, encoding, keep_crlf, DOC_SEPARATOR, LIST_READ_CHARS))[0]
    except (CharlmError, OSError):
        return False  # the real read says what is wrong


def joined_view(corpus, separator: str) -> Optional[tuple]:
    """What the list rule reads of a corpus of several files as if they were joined by a blank line
    (corpus.DOC_SEPARATOR), whichever way they were encoded: (its first LIST_READ_CHARS characters, or None
    for a text over LIST_MAX_CHARS; whether it has a line break; whether a file holds ITEM_END itself).
    None when a corpus joined by ITEM_END cannot tell: a file holds ITEM_END, or a fixed vocabulary dropped
    separators' characters; the caller then reads the files joined by a blank line."""
    from charlm.corpus import DOC_SEPARATOR

    vocab = corpus.vocab
    if separator != ITEM_END:
        text = vocab.decode(corpus.ids[:LIST_READ_CHARS]) if corpus.chars <= LIST_MAX_CHARS else None
        return text, "\n" in vocab, ITEM_END in vocab
    joins = len(corpus.files) - 1
    if ITEM_END not in vocab or not all(c in vocab for c in DOC_SEPARATOR):
        return None
    end = vocab.chars.index(ITEM_END)
    if int(np.count_nonzero(np.asarray(corpus.ids) == end)) != joins:
        return None  # a file holds U+001E itself (or the separators were dropped)
    chars = corpus.chars + joins * (len(DOC_SEPARATOR) - len(ITEM_END))
    text = None
    if chars <= LIST_MAX_CHARS:  # each separator is one character here and len(DOC_SEPARATOR) there
        text = vocab.decode(corpus.ids[:LIST_READ_CHARS]).replace(ITEM_END, DOC_SEPARATOR)[:LIST_READ_CHARS]
    return text, True, False


@dataclass(frozen=True)
class Items:
    """The items of a text, as spans of its ids: item k is ids[start[k] : start[k] + length[k]], each
    including its closing line break."""

    ids: np.ndarray
    start: np.ndarray  # (K,)
    length: np.ndarray  # (K,)

    @classmethod
    def from_ids(cls, ids: np.ndarray, end: int) -> "Items":
        """Split ids at every `end` id (a line break, or ITEM_END between files); empty items are dropped. A
        last item without its end gets one (in a copy of the ids), so that reordered items never run together."""
        ids = np.asarray(ids)
        if len(ids) and ids[-1] != end:
            ids = np.append(ids, np.array([end], dtype=ids.dtype))
        ends = np.flatnonzero(ids == end) + 1  # one past each end
        starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
        keep = (ends - starts) > 1  # blank lines are not items
        return cls(ids, starts[keep], (ends - starts)[keep].astype(np.int64))

    def __len__(self) -> int:
        return len(self.start)

    def subset(self, which: np.ndarray) -> "Items":
        return Items(self.ids, self.start[which], self.length[which])

    def text_ids(self, order: Optional[np.ndarray] = None) -> np.ndarray:
        """The ids of the items laid end to end, in `order` (default: as they are): one gather."""
        order = np.arange(len(self)) if order is None else order
        lengths = self.length[order]
        offsets = np.repeat(self.start[order] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return np.asarray(self.ids)[offsets + np.arange(int(lengths.sum()))]

    def strings(self, decode) -> List[str]:
        """Each item's text without its end."""
        return [decode(np.asarray(self.ids)[s : s + n - 1]) for s, n in zip(self.start, self.length)]

    def lengths_chars(self) -> np.ndarray:
        """Each item's length in characters, without its end."""
        return self.length - 1


def split_items(items: Items, val_frac: float, seed: int) -> tuple:
    """(training items, validation items): a seeded random sample of items is held out, not the tail (lists
    are often sorted, so their tail is unlike the rest)."""
    rng = np.random.default_rng([seed, 0x17E75])
    n_val = max(1, int(round(len(items) * val_frac)))
    if len(items) - n_val < 1:
        n_val = len(items) - 1
    held = np.zeros(len(items), dtype=bool)
    held[rng.choice(len(items), n_val, replace=False)] = True
    return items.subset(np.flatnonzero(~held)), items.subset(np.flatnonzero(held))


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the training items in an epoch: a permutation drawn from (seed, epoch) alone."""
    return np.random.default_rng([seed, 0x5EED, epoch]).permutation(n)


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class SampledItem:
    text: str
    logprob: float  # natural log of the model's probability of the item, its closing line break included
    new: bool


def context_of(train_items: "Items", order: np.ndarray, decode, end: str) -> str:
    """The text an item starts after: the first CONTEXT_ITEMS training items of an epoch's order, each ended."""
    picked = train_items.subset(np.asarray(order[:CONTEXT_ITEMS]))
    return "".join(t + end for t in picked.strings(decode))


def item_context(payload: dict) -> str:
    """The context a checkpoint's items start after ("" for a checkpoint from before it was kept)."""
    return payload.get("corpus", {}).get("item_context", "")


def sample_items(model, vocab, count: int, known: set, prime: str = "", temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, min_length: int = 1, max_length: int = 64,
                 allow_copies: bool = False, seed: Optional[int] = None, device="cpu", batch: int = 0,
                 end: str = "\n", context: str = "") -> dict:
    """Draw items until `count` are kept; each starts after `end` (a line break, or ITEM_END) and stops at
    the next one. Returns {"items": [SampledItem], "copies": skipped copies,
    "rejected": too short or too long, "drawn": items drawn, "complete": whether count was reached}."""
    steps = draw_items(model, vocab, count, known, prime, temperature, top_k, top_p, min_length, max_length,
                       allow_copies, seed, device, batch, end, context)
    while True:
        try:
            next(steps)
        except StopIteration as finished:
            return finished.value


@torch.no_grad()  # torch wraps each resumption of a generator: the caller's grad mode is left alone
def draw_items(model, vocab, count: int, known: set, prime: str = "", temperature: float = 0.8,
               top_k: int = 0, top_p: float = 1.0, min_length: int = 1, max_length: int = 64,
               allow_copies: bool = False, seed: Optional[int] = None, device="cpu", batch: int = 0,
               end: str = "\n", context: str = "") -> Iterator[None]:
    """sample_items as a generator that yields after every model step and returns its result: the server's
    engine runs it a step at a time between the other requests' steps (the same draws, seed for seed).
    `context`: the items read before each drawn one (item_context; each ends with `end`)."""
    from charlm.sample import SampleConfig, default_context, pick

    device = torch.device(device)
    model = model.to(device).eval()
    end_id = vocab.chars.index(end) if end in vocab else None
    start = vocab.encode(end + context if end_id is not None else default_context(vocab))
    cfg = SampleConfig(length=max_length, temperature=temperature, top_k=top_k, top_p=top_p)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    batch = batch or int(min(4096, max(64, 2 * count)))
    prime_ids = torch.as_tensor(vocab.encode(prime), dtype=torch.long, device=device) if prime else None
    kept, seen = [], set()
    copies = rejected = drawn = 0
    for _ in range(MAX_ROUNDS):
        state = model.init_state(batch, device)
        x = torch.as_tensor(start, dtype=torch.long, device=device).unsqueeze(0).expand(batch, -1)
        logits, state = model(x, state)
        logits = logits[:, -1]
        logprob = torch.zeros(batch, device=device)
        if prime_ids is not None:  # the prime is the start of every item: score it, then go on from it
            for c in prime_ids:
                logprob += torch.log_softmax(logits.float(), -1)[:, c]
                logits, state = model.step(c.expand(batch), state)
        out = torch.full((batch, max_length + 1), -1, dtype=torch.long, device=device)
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        for t in range(max_length + 1):
            ids = pick(logits, cfg, generator)
            lp = torch.log_softmax(logits.float(), -1).gather(1, ids[:, None]).squeeze(1)
            logprob = torch.where(ended, logprob, logprob + lp)
            out[:, t] = torch.where(ended, torch.full_like(ids, -1), ids)
            ended |= ids == end_id if end_id is not None else torch.zeros_like(ended)
            if bool(ended.all()):
                break
            logits, state = model.step(ids, state)
            yield
        rows, lps = out.tolist(), logprob.tolist()
        for row, lp, done in zip(rows, lps, ended.tolist()):
            drawn += 1
            body = [i for i in row if i >= 0]
            if not done or body[-1:] != [end_id]:
                rejected += 1  # ran past max_length without ending
                continue
            text = prime + vocab.decode(body[:-1])
            if not (min_length <= len(text) <= max_length):
                rejected += 1
                continue
            is_new = text not in known
            if not is_new and not allow_copies:
                copies += 1
                continue
            if text in seen:
                continue  # each item once in the answer
            seen.add(text)
            kept.append(SampledItem(text, lp, is_new))
            if len(kept) == count:
                return {"items": kept, "copies": copies, "rejected": rejected, "drawn": drawn, "complete": True}
    return {"items": kept, "copies": copies, "rejected": rejected, "drawn": drawn, "complete": False}


@torch.no_grad()
def score_items(model, vocab, texts: List[str], device="cpu", batch: int = 512, end: str = "\n",
                context: str = "") -> np.ndarray:
    """Natural-log probability of each item under the model, each read as sampling writes one: from the
    state after an item's end (a line break, or ITEM_END) that followed `context` (item_context), through its
    own. Batched, padded to equal length."""
    device = torch.device(device)
    model = model.to(device).eval()
    end_id = vocab.chars.index(end)
    warm = None  # the state after reading the context up to its last end, which each row then reads
    if context:
        ctx = torch.as_tensor(vocab.encode(end + context[:-len(end)]), dtype=torch.long, device=device)[None]
        _, warm = model(ctx, model.init_state(1, device))
    out = np.zeros(len(texts), dtype=np.float64)
    for a in range(0, len(texts), batch):
        group = [np.concatenate([[end_id], vocab.encode(t), [end_id]]) for t in texts[a : a + batch]]
        width = max(len(g) for g in group)
        ids = torch.full((len(group), width), end_id, dtype=torch.long)
        for row, g in enumerate(group):
            ids[row, : len(g)] = torch.as_tensor(g)
        ids = ids.to(device)
        start = model.init_state(len(group), device) if warm is None else st.expand(warm, len(group))
        logits, _ = model(ids[:, :-1], start)
        logp = torch.log_softmax(logits.float(), -1).gather(2, ids[:, 1:, None]).squeeze(2)  # (n, width-1)
        lengths = torch.as_tensor([len(g) - 1 for g in group], device=device)
        mask = torch.arange(width - 1, device=device)[None, :] < lengths[:, None]
        out[a : a + len(group)] = (logp * mask).sum(1).double().cpu().numpy()
    return out
