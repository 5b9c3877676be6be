"""Vocabulary growth: `train --init-from` on a text holding characters the model never saw adds them.

Ids are positions in the sorted vocabulary (vocab.py), and a grown vocabulary is sorted too (the union of the
old characters and the new ones), so an old character's integer id moves up by the number of new characters
that sort before it. Nothing outside a model depends on that integer: a checkpoint names its characters (the
`vocab` string) and every command encodes through it, and keeping vocabularies sorted leaves every existing
checkpoint, the corpus cache and every reader of `vocab` unchanged. What must not change is what the model
learnt about each character, so its weights move with it:

    input  one-hot: column c of the first layer's input weights; embedding: row c of the table
           -> copied to the character's new position. A new character's column (row) starts at zero: it adds
           nothing to the first layer beyond its biases, which reads as "a character I know nothing about"
           (the mean of the old columns would read as a blend of letters, spaces and line breaks), and it
           is the same starting point for one-hot and embedding models.
    output decoder row and bias of c -> copied: every old character's logit is unchanged, in every context.
           A new character's row starts at zero and its bias at new_logit(): one logit for all contexts,
           low enough that all the new characters together take at most NEW_MASS of the probability
           whatever the hidden state (the bound is in new_logit), so the old characters' probabilities move
           by at most that much at the first step and, renormalised over the old characters, not at all.

Growth is decided before the text is encoded (decide()), so the corpus is encoded once, under the vocabulary
the run will keep; the grown checkpoint holds that vocabulary, and a resume of it reads the text as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from charlm.errors import CharlmError
from charlm.vocab import Vocabulary, describe_chars, unknown_message

# The most probability all new characters together get at the first step, in any context. Low, so the model
# starts as the one it was; not so low that the first occurrences cost dozens of nats each (-ln(1e-3) = 6.9).
NEW_MASS = 1e-3
SHOWN = 40  # new characters listed by name in the start summary


@dataclass(frozen=True)
class VocabPlan:
    """How a fine-tuning run reads its text: under `vocab` (the model's own, or grown), `unknown` ('error' or
    'skip') for what is still outside it, and which characters were added or are dropped."""

    vocab: Vocabulary
    unknown: str
    added: str = ""
    dropped: str = ""

    def summary(self, old_size: int) -> Optional[str]:
        """The start summary's vocabulary line when the text's characters are not the model's, else None."""
        if self.added:
            return f"{old_size} + {len(self.added)} new: {_listed(self.added)} ({self.vocab.size} in all)"
        if self.dropped:
            return (f"{old_size} characters (the model's); {len(self.dropped)} dropped from the text "
                    f"(--unknown skip): {_listed(self.dropped)}")
        return None


def _listed(chars: str) -> str:
    more = len(chars) - SHOWN
    return describe_chars(chars[:SHOWN]) + (f" ... ({more:,} more)" if more > 0 else "")


def decide(old: Vocabulary, text: Vocabulary, where: str, grow: bool = True,
           unknown: Optional[str] = None) -> VocabPlan:
    """The plan for fine-tuning a model of vocabulary `old` on a text whose own vocabulary is `text`.

    Characters the model lacks are added (grow, the default), dropped (unknown='skip'), or refused in the one
    wording of vocab.unknown_message (unknown='error', or grow=False)."""
    missing = "".join(old.unknown(text.chars))  # sorted
    if not missing:
        return VocabPlan(old, "error")
    if unknown == "skip":
        return VocabPlan(old, "skip", dropped=missing)
    if unknown == "error" or not grow:
        raise CharlmError(unknown_message(
            where, missing, "remove them, pass --unknown skip to drop them, or leave out "
            + ("--unknown error" if unknown == "error" else "--no-grow-vocab") + " to add them to the model"))
    return VocabPlan(old.with_chars(missing), "error", added=missing)


def new_logit(weight: torch.Tensor, bias: torch.Tensor, added: int, mass: float = NEW_MASS) -> float:
    """The bias of `added` new outputs (with zero weight rows) under which they take at most `mass` of the
    probability in any context, for a decoder (weight (V, H), bias (V,)) whose input h has |h_j| <= 1 (the
    tanh of RNN, GRU and LSTM outputs; a relu RNN's h is unbounded, and there the bound is a heuristic).

    The old logits l_i = w_i.h + b_i have log-sum-exp >= ln V + mean_i l_i (the mean of exp is at least the
    exp of the mean) = ln V + w.h + b >= ln V + b - |w|_1, where w and b are the mean row and mean bias. New
    characters at logit c take k e^c / (Z + k e^c) <= mass when c <= that bound + ln(mass / (1 - mass)) - ln k."""
    w, b = weight.double(), bias.double()
    floor = math.log(w.shape[0]) + b.mean().item() - w.mean(0).abs().sum().item()
    return floor + math.log(mass / (1 - mass)) - math.log(added)


def grow_state_dict(state: dict, embedding: int, old: Vocabulary, new: Vocabulary,
                    mass: float = NEW_MASS) -> dict:
    """A CharRNN state dict over `old` -> the same model over `new` (a superset of old, sorted): each old
    character's input and output weights at its position in `new`, the new ones initialised as the module
    docstring says. `embedding` is the model config's (0: one-hot input). Tensors that do not depend on the
    vocabulary are the same objects; with nothing added, so is every tensor."""
    missing = [c for c in old.chars if c not in new]
    if missing:
        raise ValueError(f"the new vocabulary lacks {describe_chars(missing)}")
    if new.size == old.size:
        return dict(state)
    at = torch.from_numpy(new.ids_from_codes(old.codes).astype(np.int64))  # new id of each old character
    fresh = torch.ones(new.size, dtype=torch.bool)
    fresh[at] = False
    out = dict(state)

    def moved(t: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
        shape = list(t.shape)
        shape[dim] = new.size
        grown = torch.full(shape, fill, dtype=t.dtype, device=t.device)
        grown.index_copy_(dim, at.to(t.device), t)
        return grown

    key = "embed.weight" if embedding else "rnn.weight_ih_l0"
    if embedding:
        out[key] = moved(state[key], 0)
    else:
        out[key] = moved(state[key], 1)
        if "tag_embed.weight" in state:  # a tagged one-hot model's tag vectors live in the characters' space
            out["tag_embed.weight"] = moved(state["tag_embed.weight"], 1)
    low = new_logit(state["decoder.weight"], state["decoder.bias"], int(fresh.sum()), mass)
    out["decoder.weight"] = moved(state["decoder.weight"], 0)
    out["decoder.bias"] = moved(state["decoder.bias"], 0, fill=low)
    return out


def grow_model(model, old: Vocabulary, new: Vocabulary, mass: float = NEW_MASS):
    """A new CharRNN over `new` holding `model` (over `old`) grown as grow_state_dict does."""
    from dataclasses import replace

    from charlm.model import CharRNN

    grown = CharRNN(replace(model.config, vocab_size=new.size))
    grown.load_state_dict(grow_state_dict(model.state_dict(), model.config.embedding, old, new, mass))
    return grown


def grow_tags(state: dict, input_size: int, old_tags: int, new_tags: int) -> dict:
    """A CharRNN state dict with `old_tags` tags (0: an untagged model) -> the same model with `new_tags` (the
    old tags keep their ids, the new ones follow them, "no tag" moves to the last row). A new tag's vector
    starts as "no tag"'s: it writes in the whole text's voice until it learns its own. An untagged model
    gains vectors of zero (model.py), so its predictions start unchanged under every tag."""
    if new_tags == old_tags:
        return dict(state)
    out = dict(state)
    if not old_tags:
        out["tag_embed.weight"] = state["rnn.weight_ih_l0"].new_zeros(new_tags + 1, input_size)
        return out
    table = state["tag_embed.weight"]  # (old_tags + 1, I): the last row is "no tag"
    untagged = table[-1:]
    out["tag_embed.weight"] = torch.cat([table[:-1], untagged.expand(new_tags - old_tags, -1), untagged])
    return out
