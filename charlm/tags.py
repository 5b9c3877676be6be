"""Tags: one model of many voices. A corpus carries a tag per part, the model learns a vector per tag, and
every command that walks text can be told which voice to walk it in.

Where the tags come from (`charlm train --tag-by ...`):

    folder   poems/dickinson/a.txt, poems/whitman/b.txt   -> dickinson, whitman   (the sub-folder of the input)
    file     notes/alice.txt, notes/bob.md                -> alice, bob            (the file's name, no suffix)
    field    "fr<TAB>Amélie" lines                         -> fr                    (the text is what follows
                                                                                     the first tab)

How a tagged corpus is trained. Beside the ids lies a tag track, one tag id per character (the separator
after a file is that file's). The validation text is the tail of each tag's own text (the last val_frac of
its characters), so every voice is held out and scored, not only the last one in the corpus:

    ids:   d d d d d d d d d w w w w w w       (dickinson's text, then whitman's; val_frac 1/3)
    train: d d d d d d . . . w w w w . .       each tag's head trains ...
    val:   . . . . . . d d d . . . . w w       ... and its tail validates

The streams (streams.py) gather the tag of each target beside it, so a prediction is always made in the
voice of the text it predicts. In training a row's tags are replaced by UNTAGGED for a chunk with
probability TAG_DROPOUT, so the model also learns the text as a whole: commands given no tag use it.

A list with a tag column (`--tag-by field`) becomes a list of items whose tags follow them through every
epoch's new order (items.py). Tag names are sorted; a tag's id is its place in that order, and the model's
last tag row (model.CharRNN.untagged) means no tag.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from charlm.errors import CharlmError

TAG_BY = ("folder", "file", "field")
# Each training row goes untagged for a chunk this often: enough for the model to learn the whole text's
# voice (the default when no tag is given), few enough to leave the tags' own conditioning almost all the data.
TAG_DROPOUT = 0.1
MAX_TAGS = 1000  # a tag per file of a large folder is a mistake for --tag-by folder, not a voice per file


@dataclass(frozen=True)
class TagSet:
    """A model's tags: names in id order, and what share of the training text each had."""

    names: Tuple[str, ...]
    chars: Tuple[int, ...] = ()  # characters of the corpus under each tag

    @classmethod
    def from_payload(cls, payload: dict) -> Optional["TagSet"]:
        info = payload.get("corpus", {}).get("tags")
        if not info:
            return None
        return cls(tuple(info["names"]), tuple(info.get("chars", ())))

    def to_dict(self, tag_by: str) -> dict:
        return {"by": tag_by, "names": list(self.names), "chars": list(self.chars)}

    def __len__(self) -> int:
        return len(self.names)

    def id(self, name: str) -> int:
        """The id of a tag name, or a CharlmError listing the known ones."""
        try:
            return self.names.index(name)
        except ValueError:
            raise CharlmError(f"unknown tag {name!r}; this model knows {known_list(self.names)}")

    def shares(self) -> List[Tuple[str, int, float]]:
        total = max(1, sum(self.chars))
        return [(n, c, c / total) for n, c in zip(self.names, self.chars)]


def known_list(names: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def no_tags_message(what: str) -> str:
    return f"{what} was trained without tags, so it takes no --tag; train with --tag-by folder, file or field"


# ---------------------------------------------------------------------------------------------- from files
def file_tags(inputs: Sequence, files: Sequence[Path], tag_by: str) -> List[str]:
    """The tag of each of `files` (corpus.expand_inputs of `inputs`): its sub-folder under the input folder it
    was found in (folder), or its name without the suffix (file). A file given by itself takes its own
    folder's name under --tag-by folder."""
    if tag_by == "file":
        return [f.stem or f.name for f in files]
    roots = [Path(i) for i in inputs if Path(i).is_dir()]
    tags = []
    for f in files:
        root = next((r for r in roots if _is_under(f, r)), None)
        if root is None:
            tags.append(f.resolve().parent.name)
            continue
        parts = f.relative_to(root).parts
        if len(parts) < 2:
            raise CharlmError(f"{f} is not in a sub-folder of {root}; --tag-by folder takes each sub-folder as a "
                              f"tag ({root}/NAME/...): move it into one, or use --tag-by file")
        tags.append(parts[0])
    return tags


def _is_under(f: Path, root: Path) -> bool:
    try:
        f.relative_to(root)
        return True
    except ValueError:
        return False


def check_tags(names: Sequence[str], where: str) -> None:
    distinct = sorted(set(names))
    if len(distinct) < 2:
        raise CharlmError(f"{where} gives only one tag ({distinct[0] if distinct else 'none'}); tags need at least "
                          "two parts of the text to tell apart")
    if len(distinct) > MAX_TAGS:
        raise CharlmError(f"{where} gives {len(distinct):,} tags (at most {MAX_TAGS:,}); tag by folder or by a "
                          "field with fewer values")


def track(n: int, starts: Sequence[int], file_tag_ids: Sequence[int], count: int) -> np.ndarray:
    """The tag track of a corpus of n characters whose files begin at `starts`: each character gets its
    file's tag id (of `count` tags)."""
    starts = np.asarray(list(starts) + [n], dtype=np.int64)
    return np.repeat(np.asarray(file_tag_ids, dtype=tag_dtype(count)), np.diff(starts))


def tag_dtype(count: int):
    return np.uint8 if count < 255 else np.uint16


# ---------------------------------------------------------------------------------------------- tag fields
def split_fields(text: str, name: str) -> Tuple[List[str], List[str]]:
    """A `tag<TAB>text` list -> (each line's text, each line's tag). Blank lines are skipped; a line without a
    tab, or with an empty tag, is refused with its number."""
    texts, tags = [], []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        tag, tab, rest = line.partition("\t")
        tag = tag.strip()
        if not tab or not tag:
            what = "has no tab" if not tab else "has an empty tag"
            raise CharlmError(f"{name}, line {number}, {what}: --tag-by field reads TAG<TAB>TEXT lines "
                              f"({line[:40]!r})")
        texts.append(rest)
        tags.append(tag)
    if not texts:
        raise CharlmError(f"{name} has no TAG<TAB>TEXT lines")
    return texts, tags


# ---------------------------------------------------------------------------------------------- the split
def split_by_tag(ids: np.ndarray, tags: np.ndarray, count: int, val_frac: float, path="corpus") -> tuple:
    """(train ids, train tags, val ids, val tags): each tag's last val_frac of characters validates, the rest
    trains (copies, in corpus order). Every tag keeps >= 2 characters on each side."""
    tags = np.asarray(tags)
    per_tag = np.bincount(tags, minlength=count)
    n_val = np.maximum(2, np.round(per_tag * val_frac)).astype(np.int64)
    short = [t for t in range(count) if per_tag[t] - n_val[t] < 2]
    if short:
        raise CharlmError(f"{path}: tag #{short[0]} has only {per_tag[short[0]]} character(s); every tag needs at "
                          "least 4 to train and validate")
    # rank of each character among its tag's characters, in corpus order
    order = np.argsort(tags, kind="stable")
    rank = np.empty(len(tags), dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(per_tag)[:-1]])
    rank[order] = np.arange(len(tags)) - np.repeat(first, per_tag)
    held = rank >= (per_tag - n_val)[tags]
    ids = np.asarray(ids)
    return ids[~held], tags[~held], ids[held], tags[held]


def by_tag(ids: np.ndarray, tags: np.ndarray, count: int) -> Dict[int, np.ndarray]:
    """Each tag's characters of a text, in order: what `eval --by-tag` scores one tag at a time."""
    tags = np.asarray(tags)
    return {t: np.asarray(ids)[tags == t] for t in range(count) if (tags == t).sum() >= 2}


# ---------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class TaggedCorpus:
    corpus: object  # corpus.CorpusText
    track: np.ndarray  # (N,) the tag id of each character of corpus.ids
    tags: TagSet


def _tag_set(names_per_part: Sequence[str], where: str, known: Optional[Sequence[str]],
             grow: bool = False) -> TagSet:
    """The tag names of a corpus, in id order: sorted, or a model's own (a resumed or fine-tuned run), which
    then must hold every tag of the text, unless `grow` (a fine-tune): the new ones follow the model's."""
    found = sorted(set(names_per_part))
    if known is None or not grow:
        check_tags(names_per_part, where)
    if known is None:
        return TagSet(tuple(found))
    missing = [t for t in found if t not in known]
    if missing and grow:
        if len(known) + len(missing) > MAX_TAGS:
            raise CharlmError(f"{where} would give the model {len(known) + len(missing):,} tags (at most "
                              f"{MAX_TAGS:,})")
        return TagSet(tuple(known) + tuple(missing))
    if missing:
        raise CharlmError(f"{where} has tag(s) the model does not know: {known_list(missing)}; it knows "
                          f"{known_list(list(known))}")
    return TagSet(tuple(known))


def load_tagged(inputs, tag_by: str, vocab=None, encoding: str = "utf-8", keep_crlf: bool = False, cache_dir=None,
                unknown: str = "error", separator: Optional[str] = None, progress=None,
                known: Optional[Sequence[str]] = None, grow: bool = False) -> TaggedCorpus:
    """Read a corpus with its tags (--tag-by folder, file or field; the module docstring). `known`: the tag
    names of the model a run resumes or fine-tunes (the text must use only those, unless `grow`: a fine-tune
    adds the text's new tags after them)."""
    from charlm.corpus import DOC_SEPARATOR, corpus_of_text, describe_inputs, expand_inputs, load_corpus, read_file

    if tag_by not in TAG_BY:
        raise CharlmError(f"--tag-by must be one of {', '.join(TAG_BY)}, got {tag_by!r}")
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    files = expand_inputs(inputs)
    where = describe_inputs(files, inputs)
    if tag_by != "field":
        per_file = file_tags(inputs, files, tag_by)
        tags = _tag_set(per_file, f"--tag-by {tag_by} on {where}", known, grow)
        corpus = load_corpus(inputs, vocab, encoding, keep_crlf, cache_dir, unknown,
                             separator if separator is not None else DOC_SEPARATOR, progress)
        ids_of = {t: i for i, t in enumerate(tags.names)}
        line = track(corpus.chars, corpus.file_starts, [ids_of[t] for t in per_file], len(tags))
    else:
        lines, per_line = [], []
        for f in files:
            text = read_file(f, encoding, keep_crlf)
            texts, line_tags = split_fields(text, str(f))
            lines += texts
            per_line += line_tags
        tags = _tag_set(per_line, f"--tag-by field on {where}", known, grow)
        if vocab is not None and unknown == "skip":  # dropped here, so the tags stay aligned with the text
            lines = ["".join(c for c in x if c in vocab) for x in lines]
        lengths = np.asarray([len(x) + 1 for x in lines], dtype=np.int64)
        corpus = corpus_of_text("".join(x + "\n" for x in lines), where, files, "tag-by field", vocab, unknown,
                                cache_dir)
        ids_of = {t: i for i, t in enumerate(tags.names)}
        line = np.repeat(np.asarray([ids_of[t] for t in per_line], dtype=tag_dtype(len(tags))), lengths)
    counts = np.bincount(line, minlength=len(tags))
    return TaggedCorpus(corpus, line, TagSet(tags.names, tuple(int(c) for c in counts)))


def resolve(payload: dict, names: Optional[Sequence[str]], what: str = "this model") -> Optional[List[int]]:
    """The tag ids of `names` for a checkpoint (None for none given); a CharlmError for a model without tags
    or a tag it does not know (listing the ones it does)."""
    if not names:
        return None
    tags = TagSet.from_payload(payload)
    if tags is None:
        raise CharlmError(no_tags_message(what))
    return [tags.id(n) for n in names]


def field_vocab(inputs, encoding: str = "utf-8", keep_crlf: bool = False):
    """The characters of a TAG<TAB>TEXT list's text (what --tag-by field trains on, tags and tabs left out):
    what --init-from compares with the model's vocabulary (grow.py)."""
    from charlm.corpus import expand_inputs, read_file
    from charlm.vocab import Vocabulary

    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    seen = {"\n"}
    for f in expand_inputs(inputs):
        for text in split_fields(read_file(f, encoding, keep_crlf), str(f))[0]:
            seen.update(text)
    return Vocabulary("".join(sorted(seen)))
