"""CharRNN: characters in, next-character logits out, hidden state carried. Pure model: no I/O.

    ids (B, T) --encoder--> (B, T, I) --nn.RNN/GRU/LSTM stack--> (B, T, H) --decoder--> logits (B, T, V)
    tags (B, T) --tag vectors--> (B, T, I) --+--^  (a tagged model: added to the input at every step)

A tagged model (tags.py) learns one vector per tag, and one more for "no tag" (UNTAGGED: the last row, what
a call without tags uses), in the input's own space (V for one-hot, E for an embedding). The vector is added
to each character's input, so the tag enters every update of the first layer's state: the carried state is
conditioned by it at every step, in training, sampling, scoring and serving alike, and a state carried
across a change of tag follows the new one. Added, not joined: the first layer keeps its size and speed
(joining 16 more inputs cost a 2 x 256 model 5% of its steps).

The encoder is one-hot (I = V, the design's default) or a learned embedding (I = --embedding). Two ways run
the same weights: `forward` walks a whole chunk with PyTorch's fused recurrent kernel (training, evaluation,
warming on a prime; a GRU training on a CPU goes through recurrence.py, whose backward pass is written for
the recurrence), and `step` advances one character with a hand-written cell (sampling), where the fused
kernel's per-call overhead would dominate. Both take and return the carried state (state.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from charlm import recurrence
from charlm.dropout import dropout
from charlm import state as st

CELLS = ("rnn", "gru", "lstm")
# The standard deviation of the first layer's input pre-activations at initialisation (_init_input). Side by
# side at equal steps (600 of 16 x 64 on Tiny Shakespeare, 2 x 256 GRU, BENCHMARKS.md 10): a 32-wide embedding
# at PyTorch's scale (0.20) scored 1.763 (five seeds, 1.760-1.767), at 0.41 1.748, at 0.61 1.741 and 1.739 (two
# seeds), at 0.82 1.747, at 1.22 1.751; one-hot input went from 1.846 to 1.755 at 0.61. At 2,000 steps the
# embedding's gain is gone (1.480 against 1.482, two seeds each) and one-hot's holds (1.474 against 1.493, one seed).
# In the time budgets users run (one thread each, side by side): 0.02-0.13 nats/char at 1-3 minutes.
INPUT_STD = 0.6
GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # weight rows per hidden unit: PyTorch stacks the gates


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    # GRU by default: in a 10-minute CPU budget on Tiny Shakespeare it reached 1.476 nats/char against the
    # tanh RNN's 1.517, although the RNN saw 2x more text (bf16 makes GRU steps cheap; BENCHMARKS.md).
    cell: str = "gru"
    hidden: int = 512  # large enough for ~1 MB corpora; char-rnn's rule: parameters ~ corpus characters
    layers: int = 2  # a second layer buys more than a wider first one; a third rarely pays on a CPU
    dropout: float = 0.2  # between layers and before the decoder: a 10-minute run makes ~12 passes over 1 MB
    nonlinearity: str = "tanh"  # rnn only; relu learns faster at first but is less stable
    embedding: int = 0  # 0 = one-hot input (the design); N = a learned N-dim embedding
    tags: int = 0  # named tags the model is conditioned on (0: untagged); one more vector means "no tag"

    def __post_init__(self):
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be tanh or relu, got {self.nonlinearity!r}")
        if min(self.vocab_size, self.hidden, self.layers) < 1 or min(self.embedding, self.tags) < 0:
            raise ValueError("vocab_size, hidden and layers must be positive, embedding and tags >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)


class CharRNN(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embedding) if c.embedding else None
        in_size = c.embedding or c.vocab_size
        # a tagged model: one vector per tag and the last for "no tag", in the input's space, from zero: the
        # model starts as the untagged one and each tag moves from it as far as its text asks (random
        # vectors as long as a character's input ended 0.10-0.17 nats/char behind, BENCHMARKS.md 15)
        self.tag_embed = nn.Embedding(c.tags + 1, in_size) if c.tags else None
        if self.tag_embed is not None:
            nn.init.zeros_(self.tag_embed.weight)
        kwargs = dict(num_layers=c.layers, batch_first=True, dropout=c.dropout if c.layers > 1 else 0.0)
        if c.cell == "rnn":
            self.rnn = nn.RNN(in_size, c.hidden, nonlinearity=c.nonlinearity, **kwargs)
        else:
            self.rnn = (nn.GRU if c.cell == "gru" else nn.LSTM)(in_size, c.hidden, **kwargs)
        self.decoder = nn.Linear(c.hidden, c.vocab_size)
        self._init_input()

    def _init_input(self) -> None:
        """Start the first layer's input pre-activations at a standard deviation of INPUT_STD, whatever the
        input. PyTorch's recurrent layers draw every weight from U(-1/sqrt(H), 1/sqrt(H)) (std 1/sqrt(3H)), so a
        one-hot character would enter with 0.036 for H = 256 and an N(0, 1) embedding of 32 with 0.20: either
        way the state hears its input faintly, and the first minutes go to growing those weights.
        One-hot: each character's column of W_ih is drawn from U(-a, a), a = INPUT_STD * sqrt(3). Embedding:
        its rows are drawn from N(0, s^2) with s = INPUT_STD * sqrt(3H / E), the first layer's weights kept."""
        c = self.config
        w_ih = self.rnn.weight_ih_l0
        with torch.no_grad():
            if self.embed is None:
                nn.init.uniform_(w_ih, -INPUT_STD * 3 ** 0.5, INPUT_STD * 3 ** 0.5)
            else:
                nn.init.normal_(self.embed.weight, std=INPUT_STD * (3 * c.hidden / c.embedding) ** 0.5)

    def init_state(self, batch: int, device=None) -> st.State:
        c = self.config
        return st.zeros(c.cell, c.layers, batch, c.hidden, device=device)

    @property
    def untagged(self) -> int:
        """The tag id of "no tag": the last row of the tag embedding."""
        return self.config.tags

    def tag_ids(self, tags, like: torch.Tensor) -> Optional[torch.Tensor]:
        """tags (None, an int, (B,) or the shape of `like`) -> ids shaped like `like`; None for an untagged
        model. None on a tagged model means UNTAGGED."""
        if self.tag_embed is None:
            return None
        if tags is None:
            tags = self.untagged
        tags = torch.as_tensor(tags, dtype=torch.long, device=like.device)
        if tags.dim() < like.dim():  # one tag per row, or one for all: the same at every step
            tags = tags.reshape(tags.shape + (1,) * (like.dim() - tags.dim()))
        return tags.expand_as(like)

    def encode(self, ids: torch.Tensor, tags=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, I) inputs. One-hot is built one chunk at a time, never for a whole corpus."""
        if self.embed is not None:
            x = self.embed(ids)
        else:
            x = F.one_hot(ids, self.config.vocab_size).to(self.decoder.weight.dtype)
        tags = self.tag_ids(tags, ids)
        if tags is not None:
            x = x + self.tag_embed(tags).to(x.dtype)  # (B, T, I)
        return x

    def conditioned(self, tag) -> "Conditioned":
        """This model with `tag` (an int, or (B,) one per row) given to every call: for the library's walkers
        (sampling, scoring, items) that call forward and step without tags."""
        return Conditioned(self, tag)

    def forward(self, ids: torch.Tensor, state: st.State, tags=None):
        """ids (B, T), state -> logits (B, T, V), new state. Teacher forcing: ids are the true characters.
        tags: None, an int, (B,) or (B, T) tag ids (a tagged model; None is UNTAGGED).

        The new state has the dtype of the state passed in (fp32 from init_state) whatever autocast computed
        in: under bf16 autocast the CPU's LSTM and RNN return a bf16 state, which would then be carried into
        fp32 steps, saved in checkpoints, and refused by oneDNN when a run resumes in fp32."""
        x = self.encode(ids, tags)  # (B, T, I)
        carried = st.dtype(state)
        onednn = torch.backends.mkldnn
        before, onednn.enabled = onednn.enabled, self._use_onednn(x)
        try:
            if self._rnn_outside_autocast(x):
                # cuDNN's autocast wrapper casts the RNN to fp16 whatever dtype autocast was asked for, and
                # charlm has no loss scaling: run the recurrent kernel in fp32 storage instead (TF32 tensor
                # cores where torch.backends.cudnn.allow_tf32, PyTorch's default); the decoder stays in bf16.
                with torch.autocast(x.device.type, enabled=False):
                    out, state = self.rnn(x.float(), st.cast(state, torch.float32))  # (B, T, H)
            elif recurrence.usable(self.rnn, x):  # CPU GRU training: the recurrence's own backward
                out, state = recurrence.gru_stack(self.rnn, x, state)  # (B, T, H)
            else:
                out, state = self.rnn(x, state)  # (B, T, H)
        finally:
            onednn.enabled = before
        return self.decoder(dropout(out, self.config.dropout, self.training)), st.cast(state, carried)

    @staticmethod
    def _rnn_outside_autocast(x: torch.Tensor) -> bool:
        """True on CUDA under a non-fp16 autocast (bf16): see forward. fp16 autocast is what cuDNN's wrapper
        does anyway, and CPU autocast computes in the dtype asked for."""
        kind = x.device.type
        return kind == "cuda" and torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) != torch.float16

    def _use_onednn(self, x: torch.Tensor) -> bool:
        """oneDNN's fused RNN is the faster CPU kernel for LSTM and for bf16, PyTorch's own for fp32 RNN/GRU
        (bench/throughput.py measures both; 1.2-1.3x either way on a 2-core CPU)."""
        if x.device.type != "cpu":
            return True
        if torch.is_autocast_enabled("cpu"):
            # oneDNN has no bf16 LSTM primitive on a CPU without native bf16 (it refuses to build one):
            # PyTorch's own kernel runs it there
            from charlm.runtime import cpu_has_native_bf16

            return cpu_has_native_bf16() or self.config.cell != "lstm"
        return self.config.cell == "lstm"

    @torch.no_grad()
    def step(self, ids: torch.Tensor, state: st.State, tags=None):
        """One character per stream: ids (B,), state -> logits (B, V), new state. Same maths as forward,
        written out per layer so that a step costs one pass over the weights and a handful of kernels.
        tags: None, an int or (B,) tag ids (a tagged model)."""
        c = self.config
        rnn = self.rnn
        if self.embed is not None:
            x, first_is_lookup = self.embed(ids), False  # (B, E)
        else:
            x, first_is_lookup = None, True
        tags = self.tag_ids(tags, ids)
        if tags is not None and not first_is_lookup:
            x = x + self.tag_embed(tags)  # (B, E)
        hs, cs = (state if c.cell == "lstm" else (state, None))
        new_h, new_c = [], []
        for k in range(c.layers):
            w_ih, w_hh = getattr(rnn, f"weight_ih_l{k}"), getattr(rnn, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(rnn, f"bias_ih_l{k}"), getattr(rnn, f"bias_hh_l{k}")
            if k == 0 and tags is not None and first_is_lookup:  # one-hot: the lookup plus the tag's product
                b_ih = b_ih + F.linear(self.tag_embed(tags), w_ih)  # (B, G*H)
            if k == 0 and first_is_lookup:
                gi = w_ih.t()[ids] + b_ih  # (B, G*H): the one-hot product is a column lookup
            else:
                gi = F.linear(x, w_ih, b_ih)  # (B, G*H)
            gh = F.linear(hs[k], w_hh, b_hh)  # (B, G*H)
            if c.cell == "rnn":
                act = torch.tanh if c.nonlinearity == "tanh" else torch.relu
                h = act(gi + gh)
            elif c.cell == "gru":
                i_r, i_z, i_n = gi.chunk(3, dim=1)
                h_r, h_z, h_n = gh.chunk(3, dim=1)
                r = torch.sigmoid(i_r + h_r)
                z = torch.sigmoid(i_z + h_z)
                n = torch.tanh(i_n + r * h_n)
                h = n + z * (hs[k] - n)  # = (1 - z) * n + z * h
            else:
                i, f, g, o = (gi + gh).chunk(4, dim=1)
                cell = torch.sigmoid(f) * cs[k] + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(cell)
                new_c.append(cell)
            new_h.append(h)
            x = h  # dropout is off at sampling time
        h_all = torch.stack(new_h)  # (layers, B, H)
        new_state = (h_all, torch.stack(new_c)) if c.cell == "lstm" else h_all
        return self.decoder(x), new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class Conditioned:
    """A CharRNN with a fixed tag (an int, or one per row) given to forward and step; everything else is the
    model's. `to` and `eval` return the view, so walkers that write `model = model.to(device).eval()` keep
    it."""

    def __init__(self, model: CharRNN, tag):
        self.model, self.tag = model, tag

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, ids, state, tags=None):
        return self.model(ids, state, self.tag if tags is None else tags)

    forward = __call__

    def step(self, ids, state, tags=None):
        return self.model.step(ids, state, self.tag if tags is None else tags)

    def to(self, *args, **kwargs) -> "Conditioned":
        self.model.to(*args, **kwargs)
        if isinstance(self.tag, torch.Tensor):
            self.tag = self.tag.to(self.model.decoder.weight.device)
        return self

    def eval(self) -> "Conditioned":
        self.model.eval()
        return self


@torch.no_grad()
def start_state(model, batch: int, device=None, context_id: Optional[int] = None) -> st.State:
    """Where every stream starts, in training, evaluation, scoring and sampling alike: the zero state, then
    (given context_id: the text's line break, sample.default_context) the state after reading that one
    character, in eval mode. `model` is a CharRNN or a tagged model's Conditioned view (the context is read in
    its voice).

    Why not zeros: a model meets the zero state only where a stream begins, a few dozen times an epoch, and
    what it does there is barely trained. An LSTM's cell state is unbounded, and one 10-minute model of Tiny
    Shakespeare, started from zeros on "BA" (a prime, or a validation row's first characters), latched a cell
    into counting without end and wrote "&3&&3..." from then on: 43 of 2,704 two-letter primes did it, and 1 of
    the final report's 32 rows, whose 52.8 nats/char made the report 3.05 where one stream gives 1.45. After
    a line break first, none of the 2,704 did, and every row count gave 1.4533 (BENCHMARKS.md 10). A text
    begins after a line break anyway, and GRU models score the same either way (1.4518 against 1.4519)."""
    state = model.init_state(batch, device)
    if context_id is None:
        return state
    was = model.training
    model.eval()
    try:
        _, state = model(torch.full((batch, 1), int(context_id), dtype=torch.long, device=device), state)
    finally:
        model.train(was)
    return state


def layer_parameter_counts(config: ModelConfig) -> list:
    """(name, shape description, parameter count) per layer, by the same formulas PyTorch's modules use:
    a recurrent layer with input I and H units has G*H*(I + H) weights and 2*G*H biases (G gates)."""
    c = config
    g = GATES[c.cell]
    rows = []
    if c.embedding:
        rows.append(("embedding", f"{c.vocab_size} -> {c.embedding}", c.vocab_size * c.embedding))
    else:
        rows.append(("one-hot", f"{c.vocab_size} -> {c.vocab_size}", 0))
    in_size = c.embedding or c.vocab_size
    if c.tags:
        rows.append(("tag vectors", f"{c.tags} + untagged -> {in_size}", (c.tags + 1) * in_size))
    for k in range(c.layers):
        name = f"{c.cell}{'-' + c.nonlinearity if c.cell == 'rnn' else ''} {k}"
        rows.append((name, f"{in_size} -> {c.hidden}", g * c.hidden * (in_size + c.hidden) + 2 * g * c.hidden))
        in_size = c.hidden
    rows.append(("decoder", f"{c.hidden} -> {c.vocab_size}", c.hidden * c.vocab_size + c.vocab_size))
    return rows
